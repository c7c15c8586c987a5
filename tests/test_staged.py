"""`staged.divide`: the averaging step of the shared-memory sums, against numpy's division."""

import numpy as np
import pytest

from mpiml.comm.staged import divide


@pytest.mark.parametrize("dtype, bits", [(np.float32, np.uint32), (np.float64, np.uint64)])
@pytest.mark.parametrize("divisor", [1, 2, 3, 4, 6, 8, 64, 1024])
def test_divide_gives_the_bits_of_a_division(dtype, bits, divisor):
    rng = np.random.default_rng(divisor)
    info = np.finfo(dtype)
    values = np.concatenate([
        rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096),
        rng.uniform(-1, 1, 512) * info.smallest_normal,  # subnormal results lose low bits
        [info.smallest_subnormal, -info.smallest_subnormal, 3 * info.smallest_subnormal,
         info.max, -info.max, 0.0, -0.0, np.inf, -np.inf, np.nan],
    ]).astype(dtype)
    expected = np.divide(values, divisor)
    divide(values, divisor)
    assert values.dtype == dtype
    np.testing.assert_array_equal(values.view(bits), expected.view(bits))
