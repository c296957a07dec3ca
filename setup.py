"""The package list, which ``pyproject.toml`` cannot compute: everything in ``avrec/`` plus the
layers kept in the top-level folders, installed under the one ``avrec`` namespace
(``encoders/`` as ``avrec.encoders``, ...: ``package-dir`` in ``pyproject.toml``). Namespace
discovery, as before: subpackages, templates and the generated ``avrec/v1`` stubs (when
``make setup`` has built them) come along."""

from setuptools import find_namespace_packages, setup

LAYERS = ("encoders", "ranker", "server", "web")

setup(packages=[
    *find_namespace_packages(include=["avrec", "avrec.*"]),
    *(f"avrec.{name}" for name in find_namespace_packages(
        include=[*LAYERS, *(f"{layer}.*" for layer in LAYERS)])),
])
