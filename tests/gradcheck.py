"""Central finite differences, the independent check of every hand-written backward pass."""
import numpy as np


def numerical_gradient(array: np.ndarray, evaluate, step: float = 1e-6) -> np.ndarray:
    """d evaluate() / d array by central differences, perturbing ``array`` in place entry by entry.

    ``evaluate`` takes no arguments and returns a float computed from ``array`` (float64 arrays:
    float32 cannot resolve the differences); every entry is restored afterwards.
    """
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        plus = evaluate()
        array[index] = saved - step
        minus = evaluate()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * step)
    return grad
