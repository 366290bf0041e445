"""hkpipe: pipeline-parallel training of Haiku models in JAX."""
import setuptools

setuptools.setup(
    name="hkpipe",
    version="0.1.0",
    description="Pipeline-parallel training of Haiku models in JAX (MPMD, SPMD, pmap).",
    packages=setuptools.find_packages(include=["hkpipe", "hkpipe.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "dm-haiku==0.0.17",
        "optax>=0.2.8,<0.3",
        "chex>=0.1.92",
        "orbax-checkpoint>=0.12,<0.13",
        "absl-py",
        "ml-collections",
        "numpy",
        "matplotlib",  # loss.png (hkpipe.report)
        "tokenizers>=0.20",  # data.tokenizer="bpe" (hkpipe/_src/tokenizer.py), trained locally
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "tensorboard",  # tensorboard: reads our event files back
                 # the docs site (tests/test_docs_site.py builds it with --strict)
                 "mkdocs>=1.6,<2", "mkdocstrings[python]>=1.0,<2", "mkdocstrings-python>=2.0,<3"],
    },
    entry_points={},
)
