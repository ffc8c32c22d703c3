from mke_plugins.testing import parametrize_with_checks


@parametrize_with_checks(["HelloFT"])
def test_conformance(method, check):
    check(method)
