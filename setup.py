"""fairseq-arch: ARCH adversarial regularization with caching, as a fairseq plugin.

Install with ``bash scripts/install.sh`` (it installs torch and fairseq the right
way first, then ``pip install -e .``). See README, "Dependencies".
"""

from setuptools import find_packages, setup

setup(
    name="fairseq-arch",
    version="0.1.0",
    description="ARCH (Adversarial Regularization with CacHing, Zuo et al. 2021) for fairseq NMT",
    packages=find_packages(include=["fairseq_arch", "fairseq_arch.*"]),
    python_requires=">=3.11,<3.13",  # ve-fairseq 0.12.3 ships cp311/cp312 wheels only
    install_requires=[
        # torch: reuse the installed one (scripts/install.sh puts the CPU wheel
        # torch==2.13.0 there when there is none); an open range here would pull a
        # multi-GB CUDA build on a machine without torch.
        "torch>=2.1",
        # fairseq's real runtime dependencies (ve-fairseq itself is installed with
        # --no-deps from requirements/fairseq.txt: its torchaudio pin would
        # replace torch)
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.4",
        "bitarray",
        "regex",
        "sacrebleu>=2.0",
        "numpy",
        "cffi",
        "tqdm",
        "scikit-learn",
        "packaging",
        # ours: the plugin, scripts/ and the recipes (scripts/recipes/prepare.py tokenises
        # with sacremoses and learns a joint sentencepiece model)
        "sentencepiece",
        "sacremoses>=0.1",
        # fairseq-interactive's --bpe subword_nmt on fairseq's own IWSLT'14 data (README, Evaluate)
        "subword-nmt>=0.3.8",
        # faiss is an extra, one of two: faiss-cpu and faiss-gpu* both install the
        # package `faiss`, so having both makes the install order choose (and removing
        # one breaks the other); the plugin refuses that state. Without faiss the
        # neighbour search uses exact tiled torch matmuls (same neighbours, slower).
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.7"],
        # CUDA 12 builds (pulls the CUDA 12 runtime and cuBLAS wheels)
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # the range the suite was run on (pytest 9.0.3 and 9.2.0, pytest-xdist 3.8.0: scripts/test.sh
        # runs the test files on two workers); scripts/install.sh installs it
        "test": ["pytest>=9.0,<9.3", "pytest-xdist>=3.5,<4"],
        "bench": ["matplotlib>=3.5"],
    },
)
