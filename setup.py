"""StepPO for verl: a verl plugin for step-level credit assignment in multi-turn LLM agents.

Installs into an existing verl environment. torch and verl are deliberately not pinned beyond the
verl release line we test (0.9.x), so `pip install -e .` never reinstalls or upgrades them.
"""

from setuptools import find_packages, setup

setup(
    name="steppo-verl",
    version="0.1.0",
    description="StepPO (step-level MDP, step-level GAE, step-aligned ratios) as a verl plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["steppo_verl", "steppo_verl.*"]),
    include_package_data=True,
    package_data={"steppo_verl": ["**/*.yaml", "**/*.json", "**/*.jsonl"]},
    # Every third-party package steppo_verl imports by name, beyond those verl requires itself (numpy, pandas,
    # pyarrow, datasets, hydra-core, ray, transformers with tokenizers). fastapi and uvicorn come only with
    # verl[verl-core], httpx and psutil with no verl extra; pydantic and starlette arrive with fastapi but are
    # imported by name. Users: the retrieval server and client (httpx, fastapi, starlette, pydantic, uvicorn)
    # and the cpu platform (psutil).
    install_requires=[
        "verl>=0.9.1,<0.10",
        "bm25s>=0.3",
        "PyStemmer>=3.0",
        "psutil>=5.9",
        "httpx>=0.24",
        "fastapi>=0.100",
        "starlette",
        "pydantic>=2",
        "uvicorn>=0.22",
    ],
    extras_require={
        # GPU nodes: the rollout engine verl 0.9.1 is tested with, and flash attention.
        "vllm": ["vllm>=0.24,<0.25"],
        "flash-attn": ["flash-attn>=2.8"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        # rank_bm25: the naive BM25 baseline of bench_retrieval.py; matplotlib: the curves of bench_learning.py
        "bench": ["rank_bm25", "matplotlib"],
        # TextWorld tasks (steppo_verl/tasks/textworld): optional only, its game interpreter build is GPL.
        "textworld": ["textworld>=1.7"],
    },
    entry_points={"verl.plugins": ["steppo = steppo_verl.plugin"]},
)
