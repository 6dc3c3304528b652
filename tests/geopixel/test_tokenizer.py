"""Tokenizer parity with the reference (transformers 4.33 InternLM2Tokenizer) and prompt layouts.

Goldens: tokenization.json (22 cases), chat_* (inference layouts), tf_* (teacher-forced answers
and evaluate() responses), train_sample.* (training layout and labels).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from geopixel import result as result_module
from geopixel.result import GeoPixelResult
from geopixel.tokenizer import (
    BOP_TOKEN,
    EOP_TOKEN,
    GCG_QUERY,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    RES_ANSWER,
    RRSIS_TEMPLATE,
    SEG_TOKEN,
    GeoPixelTokenizer,
    chat_prompt,
    clean_response,
    conversation_text,
    mask_human_targets,
    parse_phrases,
    strip_markers,
)
from safetensors.numpy import load_file

CHAT_CASES = [f"{task}_img_{img}" for task in ("rrsis", "gcg") for img in ("800x800_hd9", "1000x600_hd4")]
N_TOKENIZATION_CASES = 22


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(golden_dir: Path) -> GeoPixelTokenizer:
    return GeoPixelTokenizer.from_dir(golden_dir)


@pytest.fixture(scope="module")
def tok_golden(golden_dir: Path) -> dict:
    data = _json(golden_dir / "tokenization.json")
    assert len(data["cases"]) == N_TOKENIZATION_CASES
    return data


@pytest.mark.parametrize("index", range(N_TOKENIZATION_CASES))
def test_tokenization_case(tok: GeoPixelTokenizer, tok_golden: dict, index: int) -> None:
    case = tok_golden["cases"][index]
    text = case["text"]
    assert tok.encode(text, add_bos=False) == case["ids_no_special"]
    assert tok.encode(text, add_bos=True) == case["ids_with_bos"]
    assert tok.tokenize(text, add_bos=False) == case["tokens_no_special"]
    assert tok.tokenize(text, add_bos=True) == case["tokens_with_bos"]
    for suffix, key in (("no_special", "ids_no_special"), ("with_bos", "ids_with_bos")):
        ids = case[key]
        assert tok.decode(ids, skip_special_tokens=False) == case[f"decode_{suffix}"]
        assert tok.decode(ids, skip_special_tokens=True) == case[f"decode_skip_special_{suffix}"]


def test_special_ids(tok: GeoPixelTokenizer, tok_golden: dict) -> None:
    special = tok_golden["special"]
    assert len(tok) == special["len_tokenizer"] == 92553
    assert tok.sp_size == special["sp_vocab_size"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (special["bos_token_id"], special["eos_token_id"], 0)
    assert (tok.seg_id, tok.bop_id, tok.eop_id) == (
        special["seg_token_idx"], special["bop_token_idx"], special["eop_token_idx"]
    )
    assert tok.im_end_id == special["UNUSED_TOKEN_145_id"]
    assert tok.im_start_id == special["UNUSED_TOKEN_146_id"]
    assert tok.added_tokens == special["added_tokens_encoder"]


def test_fallback_ids_without_json(golden_dir: Path, tok: GeoPixelTokenizer, tmp_path: Path) -> None:
    shutil.copy(golden_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    bare = GeoPixelTokenizer.from_dir(tmp_path)
    from_file = GeoPixelTokenizer.from_file(golden_dir / "tokenizer.model")
    text = "<|im_start|>The <p> red car </p> [SEG] .</s> and <unk>"
    for other in (bare, from_file):
        assert other.added_tokens == tok.added_tokens
        assert len(other) == len(tok)
        ids = tok.encode(text, add_bos=True)
        assert other.encode(text, add_bos=True) == ids
        for skip in (False, True):
            assert other.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_measured_res_turn(tok: GeoPixelTokenizer) -> None:
    """ARCHITECTURE.md §7's full measured example (RES turn, add_special_tokens=True)."""
    text = conversation_text([
        {"from": "human", "value": RRSIS_TEMPLATE.format("red car")},
        {"from": "gpt", "value": RES_ANSWER},
    ])
    expected = [1, 92543, 1008, 364, 13045, 629, 3572, 395, 58459, 7064, 500, 2674, 1952, 435, 550, 2321, 345,
                92542, 364, 92543, 525, 11353, 364, 39584, 328, 563, 505, 92550, 281, 92542, 364, 2]
    assert tok.encode(text, add_bos=True) == expected


def test_strip_rules(tok: GeoPixelTokenizer) -> None:
    # measured with 4.33 (§7): no stripping around </s>; added tokens strip \n and \t too
    assert tok.tokenize("a </s> b", add_bos=False) == ["a", "▁", "</s>", "▁b"]
    assert tok.encode("x \n\t[SEG]\n y", add_bos=False) == tok.encode("x[SEG]y", add_bos=False)
    # [UNUSED_TOKEN_145] is a SentencePiece piece, not an added token: its neighbours keep their spaces
    spaced = tok.encode("x [UNUSED_TOKEN_145] y", add_bos=False)
    assert spaced != tok.encode("x[UNUSED_TOKEN_145]y", add_bos=False)


def test_decode_cleans_up_inside_pieces(tok: GeoPixelTokenizer) -> None:
    # InternLM2Tokenizer.convert_tokens_to_string always runs clean_up_tokenization on a piece run
    assert tok.decode(tok.encode("a , b . c ?", add_bos=False), skip_special_tokens=False) == "a, b. c?"
    # ... but never across an added token (" [SEG] ." keeps its space)
    assert tok.decode(tok.encode("it [SEG].", add_bos=False), skip_special_tokens=True) == "it [SEG] ."
    with pytest.raises(ValueError):
        tok.decode([len(tok)], skip_special_tokens=False)


@pytest.mark.parametrize("case", CHAT_CASES)
def test_inference_layout(tok: GeoPixelTokenizer, golden_dir: Path, case: str) -> None:
    meta = _json(golden_dir / f"chat_{case}.json")
    tensors = load_file(str(golden_dir / f"chat_{case}.safetensors"))
    query = meta["query"]
    assert query == (GCG_QUERY if case.startswith("gcg") else RRSIS_TEMPLATE.format("red car"))
    assert chat_prompt(query) == meta["prompt_text"]
    assert tok.inference_prompt_ids(query) == meta["text_token_ids"]
    layout = tok.inference_layout(meta["image_tokens"], query)
    np.testing.assert_array_equal(np.asarray(layout), tensors["input_ids_layout"])
    np.testing.assert_array_equal(np.asarray(layout) == IMAGE_TOKEN_ID, tensors["im_mask"].astype(bool))
    start, stop = meta["image_span"]
    assert layout[start - 1] == tok.bos_id and set(layout[start:stop]) == {IMAGE_TOKEN_ID}
    gen = meta["generation"]
    assert tok.response_text(gen["sequences_incl_leading_bos"]) == gen["evaluate_response"]
    assert tok.tokenize(tok.decode(gen["new_token_ids"], skip_special_tokens=False), add_bos=False) == gen[
        "new_tokens"
    ]


def test_history_prompt(tok: GeoPixelTokenizer) -> None:
    text = chat_prompt("second?", [("first?", "answer one")])
    assert text == (
        "[UNUSED_TOKEN_146]user\nfirst?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nanswer one"
        "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nsecond?[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\n"
    )
    assert tok.inference_prompt_ids("second?", [("first?", "answer one")]) == tok.encode(text, add_bos=False)


@pytest.mark.parametrize("case", CHAT_CASES)
def test_teacher_forced_answer(tok: GeoPixelTokenizer, golden_dir: Path, case: str) -> None:
    meta = _json(golden_dir / f"tf_{case}.json")
    forced = load_file(str(golden_dir / f"tf_{case}.safetensors"))["forced_token_ids"].tolist()
    answer = meta["answer_text"]
    if case.startswith("rrsis"):
        assert answer == RES_ANSWER
    assert answer.count("[SEG]") == meta["n_seg"]
    assert tok.answer_ids(answer) == forced == meta["answer_ids_from_training_format"]
    assert tok.tokenize(answer + "[UNUSED_TOKEN_145]\n</s>", add_bos=False) == meta["answer_tokens"]
    # evaluate(): decode(sequences = [dummy BOS] + answer, skip special) minus "[UNUSED_TOKEN_145]"
    response = tok.response_text([tok.bos_id, *forced])
    assert response == meta["evaluate_response"]
    assert clean_response(tok.decode(forced, skip_special_tokens=True)) == response
    # a [SEG] is read at its own input position: prompt_len + its index among the answer tokens
    seg_pos = [meta["prompt_len"] + i for i, t in enumerate(forced[:-1]) if t == tok.seg_id]
    assert seg_pos == meta["seg_positions"]
    phrases = parse_phrases(response, n_masks=meta["n_seg"])
    if case.startswith("gcg"):
        assert [p.text for p in phrases] == ["a red car", "a white building", "green trees"]
        assert [p.mask_index for p in phrases] == [0, 1, 2]
        assert all(response[p.start : p.end] == p.text for p in phrases)
    else:
        assert phrases == [] and response.count("[SEG]") == meta["n_seg"] == 1


def test_training_example(tok: GeoPixelTokenizer, golden_dir: Path) -> None:
    meta = _json(golden_dir / "train_sample.json")
    tensors = load_file(str(golden_dir / "train_sample.safetensors"))
    record = _json(golden_dir / "sample" / "GeoPixelD.json")[0]
    n_image = int((tensors["input_ids_layout"] == IMAGE_TOKEN_ID).sum())
    assert conversation_text(record["conversations"]) == meta["text_input"][0]
    input_ids, labels = tok.training_example(record["conversations"], n_image)
    np.testing.assert_array_equal(np.asarray(input_ids), tensors["input_ids_layout"])
    np.testing.assert_array_equal(np.asarray(labels), tensors["labels"])
    assert len(input_ids) == meta["seq_len"] and len(input_ids) - n_image == 177
    assert sum(label != IGNORE_INDEX for label in labels) == meta["num_label_tokens"] == 138
    assert [i for i, label in enumerate(labels) if label == tok.seg_id] == meta["seg_positions"]
    assert input_ids[n_image] == tok.bos_id and labels[:n_image] == [IGNORE_INDEX] * n_image


def test_mask_human_targets_multi_turn(tok: GeoPixelTokenizer) -> None:
    conv = [
        {"from": "human", "value": "q one"},
        {"from": "gpt", "value": "a one"},
        {"from": "user", "value": "q two"},
        {"from": "gpt", "value": "a two [SEG]"},
    ]
    ids, labels = tok.training_example(conv, 3)
    kept = tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
    # both answers with their closing [UNUSED_TOKEN_145]; the last answer's "\n" and </s>
    # (double space: the join after [SEG] plus the space 4.33 puts before a run ending in </s>)
    assert kept == "a one[UNUSED_TOKEN_145]a two [SEG]  [UNUSED_TOKEN_145]\n</s>"
    # truncated before the eos: the trailing "\n" after the last answer end stays, nothing after
    cut = ids[: ids.index(tok.eos_id)] + [tok.encode("tail", add_bos=False)[0]]
    cut_labels = mask_human_targets(cut)
    assert cut_labels[: len(cut) - 1] == labels[: len(cut) - 1] and cut_labels[-1] == IGNORE_INDEX


def test_parse_phrases_and_captions() -> None:
    text = "The <p> tennis court-1 </p> [SEG] at right, [SEG] and <p>net</p>\n[SEG] .\n"
    phrases = parse_phrases(text)
    assert [(p.text, p.mask_index) for p in phrases] == [("tennis court-1", 0), ("net", 2)]
    assert [text[p.start : p.end] for p in phrases] == ["tennis court-1", "net"]
    assert [p.mask_index for p in parse_phrases(text, n_masks=2)] == [0, -1]
    caption = strip_markers(text)
    assert caption == "The tennis court-1 at right, and net."
    empty = np.zeros((0, 1, 1), bool)
    scores = np.zeros(0, np.float32)
    result = GeoPixelResult(text=text, phrases=phrases, masks=empty, scores=scores, token_ids=[])
    assert result.caption == caption
    assert strip_markers(clean_response("Sure, it is [SEG] .[UNUSED_TOKEN_145]\n")) == "Sure, it is."
    # One implementation, with the tokenizer's markers.
    assert strip_markers is result_module.strip_markers
    assert result_module._MARKERS == (BOP_TOKEN, EOP_TOKEN, SEG_TOKEN)
