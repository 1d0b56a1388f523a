"""Packaging for privasr: private (memorization-resistant) ASR training."""
from setuptools import find_packages, setup

setup(
    name="privasr",
    version="0.1.0",
    description="Train ASR models that memorize less (per-core clipping, DP-SGD) and audit them with canaries.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # tools/ holds executables over privasr.cli, not a package: installing it would shadow any other `tools`
    packages=find_packages(include=["privasr", "privasr.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchaudio==2.11.0",
        "speechbrain==1.1.2",
        "hyperpyyaml==1.2.3",
        "sentencepiece==0.2.3",
        "jiwer==4.0.0",
        "tensorboard==2.21.0",
        "soundfile==0.14.0",
        "opacus==1.6.0",  # privacy accountants (RDP, PRV)
        "dp-accounting==0.6.0",  # independent accountant used to cross-check
        "pyyaml",  # plain study grids (privasr.study)
        "scipy",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "pytest-xdist"]},
    entry_points={
        "console_scripts": [
            "privasr-bench=privasr.cli.bench_clipping:main",
            "privasr-bench-dp=privasr.cli.bench_dp:main",
            "privasr-bench-recipe=privasr.cli.bench_recipe:main",
            "privasr-bench-ghost=privasr.cli.bench_ghost:main",
            "privasr-canary-gradients=privasr.cli.canary_gradients:main",
            "privasr-canaries=privasr.cli.make_canaries:main",
            "privasr-exposure=privasr.cli.score_exposure:main",
            "privasr-accountant=privasr.cli.accountant:main",
            "privasr-norm-quantiles=privasr.cli.norm_quantiles:main",
            "privasr-pretrained=privasr.cli.pretrained:main",
        ]
    },
)
