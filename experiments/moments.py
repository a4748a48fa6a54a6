"""Running moments of draws that arrive in chunks (one pass, float64), their standard errors,
and the delete-a-group jackknife over groups of draws."""

import numpy as np


class Moments:
    """Count, mean and the central moment sums M2, M3, M4 of the rows added so far.

    M_k = sum_i (x_i - mean)^k. Each chunk [n, ...] is merged with the pairwise
    update of Chan, Golub and LeVeque (1979), extended to the third and fourth
    moments by Pebay (2008, Sandia report SAND2008-6212), so the moments
    of many draws need one chunk in memory at a time and lose no precision to
    running sums of powers. M3 is kept only to merge M4; M4 gives the standard
    error of the variance (`variance_se`) without assuming normal draws.
    """

    def __init__(self):
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0

    @classmethod
    def of(cls, x) -> "Moments":
        """The moments of the rows of x [n, ...]; they have shape [...]."""
        x = np.asarray(x, np.float64)
        out = cls()
        out.n, out.mean = x.shape[0], x.mean(0)
        d = x - out.mean
        d2 = np.square(d)
        out.m2, out.m3, out.m4 = d2.sum(0), (d2 * d).sum(0), np.square(d2).sum(0)
        return out

    def merged(self, other: "Moments") -> "Moments":
        """The moments of the rows of self and other together (neither is changed)."""
        if other.n == 0 or self.n == 0:
            return other if self.n == 0 else self
        na, nb = self.n, other.n
        n = na + nb
        delta = other.mean - self.mean
        d2 = np.square(delta)
        out = Moments()
        out.n = n
        out.mean = self.mean + delta * nb / n
        out.m2 = self.m2 + other.m2 + d2 * na * nb / n
        out.m3 = (self.m3 + other.m3 + d2 * delta * na * nb * (na - nb) / n**2
                  + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        out.m4 = (self.m4 + other.m4 + np.square(d2) * na * nb * (na * na - na * nb + nb * nb)
                  / n**3 + 6 * d2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
                  + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        return out

    def add(self, x) -> None:
        """Merges the rows of x [n, ...] into these moments."""
        total = self.merged(Moments.of(x))
        self.n, self.mean, self.m2, self.m3, self.m4 = (total.n, total.mean, total.m2,
                                                        total.m3, total.m4)

    def variance(self) -> np.ndarray:
        """The sample variance (ddof 1) of each entry, [...].

        Raises:
          ValueError: for fewer than two rows (n - 1 = 0), rather than a NaN that
            would pass into every figure and SE built on it.
        """
        if self.n < 2:
            raise ValueError(f"a sample variance needs at least 2 draws, got {self.n}.")
        return self.m2 / (self.n - 1)

    def mean_se(self) -> np.ndarray:
        """The standard error of the mean, sqrt(variance / n), [...]."""
        return np.sqrt(self.variance() / self.n)

    def variance_se(self) -> np.ndarray:
        """The standard error of the sample variance s^2, [...].

        Var(s^2) = mu4 / n - sigma^4 (n - 3) / (n (n - 1)) for independent draws
        (any distribution with a finite fourth moment), with mu4 = M4 / n and
        sigma^2 = s^2 put in; for normal draws it is about s^2 sqrt(2 / (n - 1)).
        """
        n, var = self.n, self.variance()
        return np.sqrt(np.maximum(self.m4 / n - np.square(var) * (n - 3) / (n - 1), 0.0) / n)

    def std_se(self) -> np.ndarray:
        """The standard error of the sample std s, by the delta method: SE(s^2) / (2 s), [...]."""
        return self.variance_se() / (2 * np.sqrt(self.variance()))


def merge_all(moments) -> Moments:
    """The moments of every row of the `Moments` in `moments` together."""
    total = Moments()
    for m in moments:
        total = total.merged(m)
    return total


def leave_one_out(moments: list) -> list:
    """[the moments of every group but g, for each g] of a list of groups' `Moments`, by
    prefix and suffix merges (2G merges, not G^2): the replicates of a delete-a-group
    jackknife."""
    prefix, suffix = [Moments()], [Moments()]
    for m in moments[:-1]:
        prefix.append(prefix[-1].merged(m))
    for m in moments[:0:-1]:
        suffix.append(suffix[-1].merged(m))
    return [p.merged(q) for p, q in zip(prefix, reversed(suffix))]


def jackknife_se(replicates) -> float:
    """The delete-a-group jackknife standard error from G leave-one-out replicates [G] of a
    figure: sqrt((G - 1)/G sum_g (theta_g - mean theta)^2)."""
    replicates = np.asarray(replicates, np.float64)
    g = replicates.size
    return float(np.sqrt((g - 1) / g * np.sum(np.square(replicates - replicates.mean()))))
