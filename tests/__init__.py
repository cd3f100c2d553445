"""runplane's tests."""

import pytest

# The shared checks in tests/helpers fail with pytest's value dumps too (registered before any
# test module imports them).
pytest.register_assert_rewrite("tests.helpers")
