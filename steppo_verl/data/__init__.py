"""Dataset preparation for multi-hop QA with a search tool.

Turns HotpotQA, 2WikiMultihopQA and MuSiQue into verl parquet files (one per split) plus a JSONL
retrieval corpus of their context paragraphs; see :mod:`.prepare` for the API and the CLI
(``python -m steppo_verl.data.prepare``), :mod:`.qa` for the source formats and :mod:`.prompts` for the prompt.
"""
