"""csarm-jax: CS-ARM-BN (in-context BatchNorm adaptation with plate controls) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name='csarm-jax',
    version='0.1.0',
    description='Meta-learned BatchNorm adaptation to experimental batches using plate controls '
                '(CS-ARM-BN) in JAX/Flax',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['csarm_jax', 'csarm_jax.*']),
    python_requires='>=3.11',
    # Lower bounds only: tested with jax 0.10.2 / flax 0.12.8 (Python 3.11, CPU) and jax 0.11.x
    # (Python 3.12, CUDA). GPU/TPU users add the matching jax extra (see the README).
    install_requires=[
        'jax>=0.10.0',
        'flax>=0.12.0',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11.0',
        'grain>=0.2.12',
        'tensorstore>=0.1.75',
        'numpy>=2.0',
        'absl-py>=2.1',
        'chex>=0.1.90',
        'ml-collections>=1.0',
        'pandas>=2.2',
        'pyarrow>=16.0',
        'tifffile>=2024.8.0',
        'scikit-learn>=1.5',
        'scipy>=1.11',
        'matplotlib>=3.9',
        'tqdm>=4.66',
        'tensorboardX>=2.6',
    ],
    extras_require={
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'ruff>=0.6'],
        'cuda12': ['jax[cuda12]>=0.10.0'],
        'tpu': ['jax[tpu]>=0.10.0'],
        # torch only reads the reference's checkpoints (import_torch.py) and runs the side-by-side
        # CPU comparison (benchmark_torch.py); never needed to train or predict.
        'torch': ['torch==2.13.0'],
    },
)
