"""Running moments of draws that arrive in chunks: one pass, float64."""

import numpy as np


class Moments:
    """Count, mean and sum of squared deviations (M2) of the rows added so far.

    Each chunk [n, ...] is merged with the pairwise update of Chan, Golub and
    LeVeque (1979), so the moments of many draws need one chunk in memory at a
    time and lose no precision to a running sum of squares.
    """

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x) -> None:
        """Merges the rows of x [n, ...]; the moments have shape [...]."""
        x = np.asarray(x, np.float64)
        size, x_mean = x.shape[0], x.mean(0)
        x_m2 = np.sum(np.square(x - x_mean), 0)
        if self.n == 0:
            self.n, self.mean, self.m2 = size, x_mean, x_m2
            return
        total = self.n + size
        delta = x_mean - self.mean
        self.mean = self.mean + delta * size / total
        self.m2 = self.m2 + x_m2 + np.square(delta) * self.n * size / total
        self.n = total

    def variance(self) -> np.ndarray:
        """The sample variance (ddof 1) of each entry, [...].

        Raises:
          ValueError: with fewer than 2 rows, which leave it undefined.
        """
        if self.n < 2:
            raise ValueError(f"a sample variance needs at least 2 draws, got {self.n}.")
        return self.m2 / (self.n - 1)
