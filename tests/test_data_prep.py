"""Dataset preparation: exact parquet rows and corpora from small invented fixtures, errors, and verl loading."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from steppo_verl.data.prepare import SplitInput, main, parse_inputs, prepare
from steppo_verl.data.prompts import SYSTEM_PROMPT, build_prompt
from steppo_verl.data.qa import iter_json_array
from steppo_verl.retrieval.corpus import load_corpus

FIXTURES = Path(__file__).parent / "fixtures" / "qa"
HOTPOT_DEV = FIXTURES / "hotpotqa_dev.json"
HOTPOT_TRAIN = FIXTURES / "hotpotqa_train.json"
HOTPOT_HF = FIXTURES / "hotpotqa_hf_validation.json"
WIKI2_DEV = FIXTURES / "2wikimultihopqa_dev.json"
MUSIQUE_DEV = FIXTURES / "musique_dev.jsonl"
REPO_ROOT = Path(__file__).parent.parent

COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def expected_row(data_source, split, index, question_id, question, answers, **metadata):
    return {
        "data_source": data_source,
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Question: {question}"},
        ],
        "ability": "multihop_qa",
        "reward_model": {"style": "rule", "ground_truth": answers},
        "extra_info": {"index": index, "question_id": question_id, "split": split, "question": question, **metadata},
        "agent_name": "steppo_agent",
    }


def parquet_rows(path):
    table = pq.read_table(path)
    assert table.column_names == COLUMNS
    return table.to_pylist()


def corpus_lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def passages(*contents):
    return [{"id": str(number), "contents": text} for number, text in enumerate(contents)]


HOTPOT_TRAIN_ROWS = [
    expected_row(
        "hotpotqa", "train", 0, "hp-train-001", "What sea surrounds the nation whose capital is Castelmar?",
        ["Azure Sea"], type="bridge", level="hard",
    ),
    expected_row(
        "hotpotqa", "train", 1, "hp-train-002", "Which hills does the Amber River rise in?",
        ["Grey Hills"], type="bridge", level="easy",
    ),
]  # fmt: skip
HOTPOT_DEV_ROWS = [
    expected_row(
        "hotpotqa", "validation", 0, "hp-dev-001",
        "Which river flows through the capital of the fictional country of Veloria?",
        ["Amber River"], type="bridge", level="medium",
    ),
    expected_row(
        "hotpotqa", "validation", 1, "hp-dev-002", "Are Lumen Tower and Castelmar Bridge in the same city?",
        ["yes"], type="comparison", level="hard",
    ),
    # hp-dev-003 has an empty answer; surrounding whitespace of hp-dev-004 is dropped.
    expected_row(
        "hotpotqa", "validation", 2, "hp-dev-004", "In what year was the city on the Amber River founded?",
        ["1312"], type="bridge", level="easy",
    ),
]  # fmt: skip
# Train first (input order); each distinct (title, text) once, so the same title with other text stays.
HOTPOT_CORPUS = passages(
    "Veloria\nVeloria is a small island nation in the Azure Sea. Its capital is Castelmar.",
    "Azure Sea\nThe Azure Sea is warm all year.",
    "Amber River\nThe Amber River rises in the Grey Hills.",
    "Castelmar\nCastelmar is a port city crossed by the Amber River. It was founded in 1312.",
    "Lumen Tower\nLumen Tower is a lighthouse in Castelmar.",
    "Castelmar Bridge\nCastelmar Bridge spans the Amber River in Castelmar.",
    "Ilse Marrow\nIlse Marrow was an architect. She worked mostly on harbour buildings.",
    "Castelmar\nCastelmar was also the name of a 1950s ocean liner.",
)


def test_hotpotqa_official_json_writes_one_parquet_per_split_and_one_corpus(tmp_path):
    inputs = [SplitInput("train", str(HOTPOT_TRAIN)), SplitInput("validation", str(HOTPOT_DEV))]
    report = prepare("hotpotqa", inputs, tmp_path)

    assert parquet_rows(tmp_path / "train.parquet") == HOTPOT_TRAIN_ROWS
    assert parquet_rows(tmp_path / "validation.parquet") == HOTPOT_DEV_ROWS
    assert corpus_lines(tmp_path / "corpus.jsonl") == HOTPOT_CORPUS
    assert {split: (r.rows, dict(r.skipped)) for split, r in report.splits.items()} == {
        "train": (2, {}),
        "validation": (3, {"without an answer": 1}),
    }
    assert report.corpus_passages == len(HOTPOT_CORPUS)


def test_corpus_reads_back_through_the_retrieval_loader(tmp_path):
    prepare("hotpotqa", [SplitInput("validation", str(HOTPOT_DEV))], tmp_path, corpus_out=tmp_path / "c" / "hp.jsonl")
    written = corpus_lines(tmp_path / "c" / "hp.jsonl")
    loaded = load_corpus(tmp_path / "c" / "hp.jsonl")
    assert len(written) == 7
    assert [{"id": passage.id, "contents": passage.contents} for passage in loaded] == written


def test_hotpotqa_from_the_hub_uses_the_distractor_config_and_hub_field_layout(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return json.loads(HOTPOT_HF.read_text(encoding="utf-8"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = prepare("hotpotqa", parse_inputs(["hf:hotpotqa/hotpot_qa"], "validation"), tmp_path)

    assert calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]
    assert parquet_rows(tmp_path / "validation.parquet") == [
        expected_row(
            "hotpotqa", "validation", 0, "hf-001", "Which river flows through Castelmar?",
            ["Amber River"], type="bridge", level="medium",
        ),
        expected_row(
            "hotpotqa", "validation", 1, "hf-002", "Is Lumen Tower a lighthouse?", ["yes"],
            type="comparison", level="easy",
        ),
    ]  # fmt: skip
    assert corpus_lines(tmp_path / "corpus.jsonl") == passages(
        "Castelmar\nCastelmar is a port city crossed by the Amber River. It was founded in 1312.",
        "Lumen Tower\nLumen Tower is a lighthouse in Castelmar.",
    )
    assert report.splits["validation"].rows == 2


def test_hub_source_names_its_config_and_split_prefix(tmp_path, monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: calls.append((name, config, split)) or [])
    prepare("hotpotqa", parse_inputs(["train=hf:hotpot_qa:fullwiki"], None), tmp_path)
    assert calls == [("hotpot_qa", "fullwiki", "train")]


def test_2wikimultihopqa(tmp_path):
    report = prepare("2wikimultihopqa", [SplitInput("validation", str(WIKI2_DEV))], tmp_path)
    assert parquet_rows(tmp_path / "validation.parquet") == [
        expected_row(
            "2wikimultihopqa", "validation", 0, "2w-001",
            "Which film came out first, The Glass Orchard or Night at Pellham?", ["The Glass Orchard"],
            type="comparison",
        ),
        expected_row(
            "2wikimultihopqa", "validation", 1, "2w-002", "Where was the director of The Glass Orchard born?",
            ["Dunmere"], type="compositional",
        ),
        expected_row(
            "2wikimultihopqa", "validation", 2, "2w-003",
            "Do the directors of The Glass Orchard and Night at Pellham share a nationality?", ["no"],
            type="bridge_comparison",
        ),
    ]  # fmt: skip
    assert corpus_lines(tmp_path / "corpus.jsonl") == passages(
        "The Glass Orchard\nThe Glass Orchard is a 1961 drama film. It was directed by Tomas Reyl.",
        "Night at Pellham\nNight at Pellham is a 1974 thriller film.",
        "Tomas Reyl\nTomas Reyl (1920-1988) was a film director born in Dunmere.",
        "Aino Vask\nAino Vask is a film director from Estland.",
    )
    assert report.corpus_passages == 4


MUSIQUE_ROWS = [
    # Aliases follow the answer; repeats and blanks are dropped.
    expected_row(
        "musique", "validation", 0, "2hop__101_202", "Where was the founder of Kestrel Records born?",
        ["Hollin", "Hollin, Veloria"],
    ),
    expected_row(
        "musique", "validation", 1, "2hop__303_404", "Which river runs through the birthplace of Mara Voss?",
        ["Amber River"],
    ),
    expected_row(
        "musique", "validation", 2, "3hop__707_808_909",
        "How long is the river through the birthplace of Kestrel Records' founder?", ["210 km", "210 kilometres"],
    ),
]  # fmt: skip
MUSIQUE_CORPUS = passages(
    "Kestrel Records\nKestrel Records is a record label founded by Mara Voss.",
    "Mara Voss\nMara Voss was born in Hollin in 1950.",
    "Hollin\nHollin is a town on the Amber River.",
    "Amber River\nThe Amber River is 210 km long.",
)


def test_musique_keeps_aliases_and_skips_unanswerable_rows(tmp_path):
    report = prepare("musique", [SplitInput("validation", str(MUSIQUE_DEV))], tmp_path)
    assert parquet_rows(tmp_path / "validation.parquet") == MUSIQUE_ROWS
    assert corpus_lines(tmp_path / "corpus.jsonl") == MUSIQUE_CORPUS
    assert dict(report.splits["validation"].skipped) == {"unanswerable": 1}


def test_max_rows_caps_each_split_and_stops_reading_there(tmp_path):
    inputs = [SplitInput("train", str(HOTPOT_TRAIN)), SplitInput("validation", str(HOTPOT_DEV))]
    report = prepare("hotpotqa", inputs, tmp_path, max_rows=1)
    assert parquet_rows(tmp_path / "train.parquet") == HOTPOT_TRAIN_ROWS[:1]
    assert parquet_rows(tmp_path / "validation.parquet") == HOTPOT_DEV_ROWS[:1]
    # Only the paragraphs of the questions read: hp-train-001 and hp-dev-001.
    assert [entry["contents"].split("\n")[0] for entry in corpus_lines(tmp_path / "corpus.jsonl")] == [
        "Veloria", "Azure Sea", "Castelmar",
    ]  # fmt: skip
    assert report.corpus_passages == 3


def test_several_sources_of_one_split_share_its_file_and_index(tmp_path):
    prepare("hotpotqa", parse_inputs([str(HOTPOT_TRAIN), str(HOTPOT_DEV)], "train"), tmp_path)
    rows = parquet_rows(tmp_path / "train.parquet")
    assert [row["extra_info"]["index"] for row in rows] == [0, 1, 2, 3, 4]
    assert {row["extra_info"]["split"] for row in rows} == {"train"}


def test_cli_writes_files_and_prints_counts(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "steppo_verl.data.prepare", "--dataset", "musique",
            "--input", str(MUSIQUE_DEV), "--split", "validation",
            "--out-dir", str(tmp_path / "out"), "--corpus-out", str(tmp_path / "corpus" / "musique.jsonl"),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out_file, corpus_file = tmp_path / "out" / "validation.parquet", tmp_path / "corpus" / "musique.jsonl"
    assert result.stdout.splitlines() == [
        f"musique validation: wrote 3 rows to {out_file} (skipped: 1 unanswerable)",
        f"musique corpus: wrote 4 passages to {corpus_file}",
    ]
    assert parquet_rows(out_file) == MUSIQUE_ROWS
    assert corpus_lines(corpus_file) == MUSIQUE_CORPUS


def test_cli_reports_a_missing_file_and_writes_nothing(tmp_path, capsys):
    argv = ["--dataset", "hotpotqa", "--input", f"train={HOTPOT_TRAIN}", "--input", "validation=missing.json"]
    assert main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    assert "input file not found: missing.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_split_for_a_bare_input(tmp_path, capsys):
    assert main(["--dataset", "musique", "--input", str(MUSIQUE_DEV), "--out-dir", str(tmp_path)]) == 2
    assert "give --split or write the input as SPLIT=" in capsys.readouterr().err


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        prepare("musique", [SplitInput("validation", "nowhere.jsonl")], tmp_path)


def test_jsonl_where_a_json_array_is_expected_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"musique_dev\.jsonl: expected a JSON array"):
        prepare("hotpotqa", [SplitInput("validation", str(MUSIQUE_DEV))], tmp_path)


def test_json_array_where_jsonl_is_expected_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"2wikimultihopqa_dev\.json:1: expected JSONL"):
        prepare("musique", [SplitInput("validation", str(WIKI2_DEV))], tmp_path)


def test_record_without_a_required_field_names_the_record(tmp_path):
    source = tmp_path / "no_context.json"
    source.write_text(json.dumps([{"_id": "x", "question": "Q?", "answer": "A"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no_context\.json record 0: missing field 'context'"):
        prepare("2wikimultihopqa", [SplitInput("validation", str(source))], tmp_path / "out")


def test_truncated_json_names_the_file(tmp_path):
    source = tmp_path / "cut.json"
    source.write_text(HOTPOT_DEV.read_text(encoding="utf-8")[:900], encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut\.json: invalid JSON"):
        prepare("hotpotqa", [SplitInput("validation", str(source))], tmp_path / "out")


def test_record_without_an_answer_field_is_skipped(tmp_path):
    source = tmp_path / "test_set.json"
    record = json.loads(HOTPOT_TRAIN.read_text(encoding="utf-8"))[0]
    del record["answer"]
    source.write_text(json.dumps([record]), encoding="utf-8")
    report = prepare("hotpotqa", [SplitInput("test", str(source))], tmp_path)
    assert (report.splits["test"].rows, dict(report.splits["test"].skipped)) == (0, {"without an answer": 1})
    assert parquet_rows(tmp_path / "test.parquet") == []


def test_only_hotpotqa_loads_from_the_hub(tmp_path):
    with pytest.raises(ValueError, match="only hotpotqa"):
        prepare("musique", [SplitInput("validation", "hf:musique")], tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("squad", [SplitInput("validation", str(HOTPOT_DEV))], tmp_path)


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1 << 20])
def test_streamed_json_array_matches_a_whole_file_parse(chunk_chars):
    assert list(iter_json_array(HOTPOT_DEV, chunk_chars)) == json.loads(HOTPOT_DEV.read_text(encoding="utf-8"))


def test_empty_json_array(tmp_path):
    source = tmp_path / "empty.json"
    source.write_text(" [ ] ", encoding="utf-8")
    assert list(iter_json_array(source)) == []


def test_prompt_carries_the_tool_instructions():
    system, user = build_prompt("Who?")
    assert (system["role"], user) == ("system", {"role": "user", "content": "Question: Who?"})
    for needed in ("`search`", '{"query_list": [', "up to 4 queries", "<answer>...</answer>", "yes or no"):
        assert needed in system["content"]


def tiny_chat_tokenizer():
    """A word-level tokenizer trained on the prompt text, with a ChatML template: no hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator([SYSTEM_PROMPT, "Question: Which river flows through Castelmar?"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>",
        chat_template=CHATML,
    )  # fmt: skip


def test_verl_rlhf_dataset_loads_the_rows(tmp_path, monkeypatch):
    import datasets
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    prepare("hotpotqa", [SplitInput("validation", str(HOTPOT_DEV))], tmp_path / "data")
    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "max_prompt_length": 4096,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "cache_dir": str(tmp_path / "verl_cache"),
        }
    )
    dataset = RLHFDataset(str(tmp_path / "data" / "validation.parquet"), tiny_chat_tokenizer(), config)

    # A prompt the chat template fails on counts as overlong, so all three surviving shows the template applied.
    assert len(dataset) == 3
    item = dataset[1]
    expected = HOTPOT_DEV_ROWS[1]
    assert item["raw_prompt"] == expected["prompt"]
    assert (item["data_source"], item["agent_name"], item["index"]) == ("hotpotqa", "steppo_agent", 1)
    assert item["reward_model"] == expected["reward_model"]
    assert item["extra_info"] == expected["extra_info"]
    assert item["tools_kwargs"] == {}
    batch = collate_fn([dataset[0], item])
    assert list(batch["agent_name"]) == ["steppo_agent", "steppo_agent"]
