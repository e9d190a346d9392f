"""Structured outputs (llguidance): the constraint's shape, grammars refused with a reason, the
sampler's mask on constrained rows alone, and the demo model's outputs at temperature 1 matching
their schemas, regexes, choices and grammars."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
import torch

from pagoda.engine.config import CacheConfig, EngineConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.llm import LLM
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import Sampler
from pagoda.engine.sampling.sampling_metadata import SamplingMetadata
from pagoda.engine.structured import compiler, grammar
from pagoda.engine.structured.compiler import GrammarCompiler, fill_bitmask_async
from pagoda.engine.structured.grammar import check_structured_outputs
from pagoda.engine.structured.params import StructuredOutputsParams as S
from tests.fakes import FakeTokenizer

# nested objects, arrays, enums, patterns, required fields and bounded lengths
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"},
                },
                "required": ["id", "email"],
                "additionalProperties": False,
            },
            "status": {"enum": ["active", "suspended", "closed"]},
        },
        "required": ["user", "status"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 4,
            },
            "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
            "ok": {"type": "boolean"},
        },
        "required": ["colors", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
]


_SUMS = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'  # GBNF


def _with(so: S) -> dict[str, Any]:
    return {"structured_outputs": so}


def test_params_take_exactly_one_constraint_and_cross_the_wire() -> None:
    kinds = [
        S(json=SCHEMAS[0]),
        S(json=json.dumps(SCHEMAS[1])),
        S(json_object=True),
        S(regex=r"\d+"),
        S(choice=["yes", "no"]),
        S(grammar='root ::= "a" | "b"'),
        S(structural_tag={"structures": [], "triggers": []}),
    ]
    for so in kinds:
        assert S.from_wire(so.to_wire()) == so and hash(S.from_wire(so.to_wire())) == hash(so)
    assert S(json=SCHEMAS[0]) == S(json=json.dumps(SCHEMAS[0]))  # one cache entry either way
    for bad in ({}, {"json": {}, "regex": "a"}, {"choice": []}, {"json": "{not json"}, {"json": [1]}):
        with pytest.raises(ValueError):
            S(**bad)


def test_grammars_refuse_what_llguidance_cannot_take() -> None:
    tok: Any = FakeTokenizer()
    for so in (S(json=SCHEMAS[1]), S(regex="[a-z]+"), S(grammar='root ::= "x" root | "y"')):
        check_structured_outputs(so, tok)
    tag = {"structures": [{"begin": "<f=a>", "schema": SCHEMAS[0], "end": "</f>"}], "triggers": ["<f="]}
    check_structured_outputs(S(structural_tag=tag), tok)
    bad = {
        "json": S(json={"type": "strin"}),
        "regex": S(regex="a("),
        "grammar": S(grammar="root ::= missing"),
        "structural_tag": S(structural_tag={"structures": [{"begin": "<g>"}], "triggers": ["<f"]}),
    }
    for kind, so in bad.items():
        with pytest.raises(ValueError, match=f"invalid {kind}"):
            check_structured_outputs(so, tok)


def _meta(params: list[SamplingParams], vocab: int) -> SamplingMetadata:
    n = len(params)
    gens = [torch.Generator().manual_seed(i) if not p.greedy else None for i, p in enumerate(params)]
    return SamplingMetadata.build(params, [[1]] * n, [[]] * n, gens, vocab, [257], torch.device("cpu"))


def test_the_sampler_masks_the_constrained_rows_alone() -> None:
    """Row 1 may only take digits; rows 0 and 2 sample as they would without it, greedy or not."""
    grammars = GrammarCompiler(FakeTokenizer(), 259)  # type: ignore[arg-type]
    torch.manual_seed(0)
    logits = torch.randn(3, 259)
    logits[1, ord("x")] = 20.0  # unconstrained, row 1 would take "x"
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature)] * 3
        free = Sampler()(logits, _meta(params, 259)).token_ids
        assert free[1] == ord("x") or temperature
        [g] = grammars.submit(S(regex="[0-9]{2}"), 1).result()
        meta = _meta(params, 259)
        meta.grammar_rows = torch.tensor([1])
        meta.grammar_bitmask = fill_bitmask_async([g], 259).result()
        out = Sampler()(logits, meta).token_ids
        assert chr(out[1]).isdigit() and [out[0], out[2]] == [free[0], free[2]]


def test_draft_tokens_get_a_mask_per_position_and_the_grammar_does_not_move() -> None:
    """Speculative decoding's side: for proposed tokens, the mask after each one (as if each had
    been taken in turn), how many of them the grammar admits, and the matcher left where it was."""
    grammars = GrammarCompiler(FakeTokenizer(), 259)  # type: ignore[arg-type]
    g, plain = grammars.submit(S(regex="[0-9]{2}x"), 2).result()
    drafts = [ord("4"), ord("2"), ord("7")]  # "42" fits, then only "x" may come: "7" is refused
    assert g.admits(drafts) == 2 and g.admits([ord("a")]) == 0

    def allowed(mask: torch.Tensor) -> set[str]:
        return {chr(t) for t in range(256) if int(mask[t // 32]) >> (t % 32) & 1}

    masks = fill_bitmask_async([g, plain], 259, drafts=[drafts, []]).result()
    assert masks.shape[0] == 5  # 1 + 3 rows for g, 1 for plain
    digits = set("0123456789")
    assert allowed(masks[0]) == digits and allowed(masks[1]) == digits and allowed(masks[2]) == {"x"}
    assert allowed(masks[4]) == digits  # plain: its own first row
    assert g.admits(drafts) == 2 and allowed(fill_bitmask_async([g], 259).result()[0]) == digits


@pytest.fixture(scope="module")
def core(demo_checkpoint: Any) -> EngineCore:
    config = EngineConfig(dtype="float32", max_model_len=1024, cache=CacheConfig(kv_cache_memory=96 << 20))
    return EngineCore(config, checkpoint=demo_checkpoint)


@pytest.fixture(scope="module")
def llm(core: EngineCore) -> LLM:
    llm = LLM.__new__(LLM)
    llm.engine, llm.tokenizer, llm._next_id = core, core.tokenizer, 0
    return llm


def _chat(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_demo_outputs_at_temperature_one_match_their_constraints(llm: LLM) -> None:
    """The acceptance run: every answer validates, none is cut by max_tokens (512)."""
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        for seed in range(5):
            prompts.append(_chat(llm, "Answer in JSON."))
            so = S(json=schema)
            params.append(
                SamplingParams(temperature=1.0, max_tokens=512, seed=10 * i + seed, structured_outputs=so)
            )
    others = [
        (S(regex=r"[0-9]{3}-[0-9]{4}"), re.compile(r"[0-9]{3}-[0-9]{4}")),
        (S(choice=["positive", "negative"]), re.compile("positive|negative")),
        (
            S(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'),
            re.compile(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)"),
        ),
    ]
    for so, _ in others:
        prompts.append(_chat(llm, "Go."))
        params.append(SamplingParams(temperature=1.0, max_tokens=512, seed=5, structured_outputs=so))
    # any JSON object at all: open-ended (at temperature 1 keys and strings ramble on), so greedy
    prompts.append(_chat(llm, "Give a JSON object with a name and an age."))
    params.append(SamplingParams(temperature=0.0, max_tokens=512, structured_outputs=S(json_object=True)))
    others.append((S(json_object=True), None))
    results = llm.generate(prompts, params, use_tqdm=False)
    for res in results:
        out = res.outputs[0]
        assert out.finish_reason == "stop", (out.text, out.finish_reason)
    for res, schema in zip(results, [s for s in SCHEMAS for _ in range(5)], strict=False):
        jsonschema.validate(json.loads(res.outputs[0].text), schema)
    for res, (_, pattern) in zip(results[-len(others) :], others, strict=True):
        text = res.outputs[0].text
        assert pattern.fullmatch(text) if pattern else isinstance(json.loads(text), dict), text
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks


def test_free_rows_beside_constrained_ones_keep_their_tokens(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([_chat(llm, "Tell me about the sea.")], free, use_tqdm=False)[0].outputs[0].token_ids
    constrained = SamplingParams(
        temperature=1.0, max_tokens=64, seed=3, structured_outputs=S(json=SCHEMAS[2])
    )
    mixed = llm.generate(
        [_chat(llm, "JSON please."), _chat(llm, "Tell me about the sea."), _chat(llm, "JSON please.")],
        [constrained, free, constrained],
        use_tqdm=False,
    )
    assert mixed[1].outputs[0].token_ids == alone
    assert all(json.loads(mixed[i].outputs[0].text) for i in (0, 2))


def test_a_resumed_request_continues_inside_its_grammar(core: EngineCore) -> None:
    """A re-run elsewhere hands the output so far in as prompt tokens (resume_from): the grammar
    consumes them, so the answer goes on where it stopped. Were they not consumed, the grammar
    would ask for a fresh "{" and the greedy answer would differ."""
    prompt = LLM.__new__(LLM)
    prompt.tokenizer = core.tokenizer
    ids = _chat(prompt, "Describe a user.")
    params = SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=S(json=SCHEMAS[0]))
    whole = _run(core, "whole", ids, params)
    cut = 5  # the gateway asks the re-run for what is left of max_tokens
    rest = _run(core, "rest", ids + whole[:cut], replace(params, max_tokens=64 - cut), resume_from=cut)
    assert whole[:cut] + rest == whole and json.loads(core.tokenizer.decode(whole))


def _run(
    core: EngineCore, rid: str, ids: list[int], params: SamplingParams, resume_from: int = 0
) -> list[int]:
    core.add_request(rid, ids, params, resume_from=resume_from)
    tokens: list[int] = []
    while core.has_unfinished():
        tokens += [t for o in core.step() if o.request_id == rid for t in o.new_token_ids]
    return tokens


def test_a_request_waiting_for_its_grammar_holds_up_no_one(
    core: EngineCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    compile_now = compiler.GrammarCompiler._sequences

    def slow(self: GrammarCompiler, *args: Any) -> Any:
        assert release.wait(30)
        return compile_now(self, *args)

    monkeypatch.setattr(compiler.GrammarCompiler, "_sequences", slow)
    ids = core.tokenizer.encode("Hello")
    core.add_request("slow", ids, SamplingParams(max_tokens=8, structured_outputs=S(regex="[a-z]+ [a-z]+")))
    core.add_request("free", ids, SamplingParams(max_tokens=8, ignore_eos=True))
    got: dict[str, list[int]] = {"slow": [], "free": []}
    finished = set()
    while "free" not in finished:
        for o in core.step():
            got[o.request_id] += o.new_token_ids
            finished |= {o.request_id} if o.finished else set()
    assert len(got["free"]) == 8 and got["slow"] == [] and core.has_unfinished()
    release.set()
    while core.has_unfinished():
        for o in core.step():
            got[o.request_id] += o.new_token_ids
    assert re.fullmatch("[a-z]+ [a-z]+", core.tokenizer.decode(got["slow"]))


def test_a_server_builds_the_grammars_tokenizer_before_any_request() -> None:
    """llguidance's view of a 49k vocabulary takes ~0.5 s: a server has it built at start."""
    tok: Any = FakeTokenizer()
    grammars = GrammarCompiler(tok, 259)
    assert 259 not in grammar._tokenizers.get(tok, {})
    grammars.warm()
    grammars._pool.submit(lambda: None).result()  # the grammar thread has done what came before
    assert 259 in grammar._tokenizers[tok]
