"""pytest set-up of the benchmark cases: the test suite's ``one_thread`` for the tables' tiny cases."""

from tests.conftest import one_thread  # noqa: F401
