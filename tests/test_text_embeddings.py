"""Item embeddings from item text through a local encoder (atspeed_exp/data/text_embeddings.py), with tiny randomly
initialised encoders built and saved in the test (a BERT and a LLaMA base model, word-level tokenizers built
offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from atspeed_exp.data.atspeed_format import load_atspeed_dataset
from atspeed_exp.data.prepare import PrepareSettings, prepare_dataset
from atspeed_exp.data.sid_build import build_index, index_differences, sid_inputs
from atspeed_exp.data.synthetic_raw import write_synthetic_metadata, write_synthetic_reviews
from atspeed_exp.data.text_embeddings import encode_texts, item_texts

WORDS = ["Title", "Description", "Categories", ":", ",", "Item", "About", "more", "Beauty", "Group",
         *map(str, range(200))]


def save_tokenizer(folder: Path, bert: bool) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if bert else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    else:  # no pad token: padded with EOS
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>")
    fast.save_pretrained(folder)


def tiny_encoder(folder: Path, kind: str) -> Path:
    torch.manual_seed(0)
    vocab = len(WORDS) + 4
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64))
    model.save_pretrained(folder)
    save_tokenizer(folder, bert=kind == "bert")
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("encoders")
    return {kind: tiny_encoder(base / kind, kind) for kind in ("bert", "llama")}


def test_item_texts_one_line_per_non_empty_field(tmp_path):
    table = {"0": {"asin": "A", "title": "Item 0", "description": "", "categories": ["Beauty", "Group 1"]},
             "2": {"asin": "C", "title": "", "description": "", "categories": []}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    texts, empty = item_texts(tmp_path / "t.json", [0, 1, 2])
    assert texts == ["Title: Item 0\nCategories: Beauty, Group 1", "", ""] and empty == 2
    assert item_texts(tmp_path / "t.json", [0], ["categories"])[0] == ["Categories: Beauty, Group 1"]
    with pytest.raises(ValueError, match="fields"):
        item_texts(tmp_path / "t.json", [0], ["price"])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_encode_texts_mean_pools_each_text_alone_and_is_deterministic(encoders, kind):
    from transformers import AutoModel, AutoTokenizer

    texts = ["Title: Item 3\nDescription: About 3", "Title: Item 12", "", "Categories: Beauty, Group 4, more"]
    got = encode_texts(texts, encoders[kind], batch_size=3, max_length=32)
    assert got.shape == (4, 16) and got.dtype == torch.float64
    assert torch.equal(got, encode_texts(texts, encoders[kind], batch_size=3, max_length=32))
    model = AutoModel.from_pretrained(encoders[kind], local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(encoders[kind], local_files_only=True)
    for row, text in enumerate(texts):  # one text at a time, no padding: the plain mean over its tokens
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].mean(dim=0).double()
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)


def test_sid_index_from_item_text(encoders, tmp_path):
    reviews = write_synthetic_reviews(tmp_path / "r.json", num_users=120, num_items=60)
    meta = write_synthetic_metadata(tmp_path / "m.json", num_items=60)
    root = tmp_path / "syn"
    prepare_dataset(reviews, root, "syn", PrepareSettings(k_core=3), metadata=meta)
    embedding = {"source": "text", "path": str(encoders["bert"]), "max_length": 32, "batch_size": 8}
    report = build_index(root, "syn", embedding, [4, 4, 32], iters=20)
    index = root / "syn.LCRec-1e-3lr.json"
    first = index.read_bytes()
    facts = report["embeddings"]
    assert facts["source"] == "text" and facts["dim"] == 16 and facts["items_without_text"] > 0  # 1 in 3 has none
    # the items without text share one embedding, so one code; the last level (32 codes) separates them
    assert report["before"]["collision_rate"] > 0 and report["after"]["collision_rate"] == 0.0
    assert load_atspeed_dataset(root, "syn").num_levels == 3
    assert (root / "embeddings" / facts["cache"]).is_file()

    again = build_index(root, "syn", embedding, [4, 4, 32], iters=20)  # from the cached matrix, the same index
    assert index.read_bytes() == first and again["after"] == report["after"]
    inputs = sid_inputs(root, "rq_kmeans", embedding, [4, 4, 32], "reassign_last", 20, 0)
    assert index_differences(index, inputs) == []
    assert index_differences(index, sid_inputs(root, "rq_kmeans", {**embedding, "fields": ["title"]}, [4, 4, 32],
                                               "reassign_last", 20, 0)) == ["the embeddings changed (fields)"]
    other = tiny_encoder(tmp_path / "other", "llama")  # other encoder weights: another index
    assert "encoder" in index_differences(index, sid_inputs(root, "rq_kmeans", {**embedding, "path": str(other)},
                                                            [4, 4, 32], "reassign_last", 20, 0))[0]
