"""Fixtures live in tests/support/, one module per real service; this file only loads them."""

pytest_plugins = [
    "tests.support.build",
    "tests.support.s3",
    "tests.support.docker",
    "tests.support.proxied",
    "tests.support.fleet",
]
