"""GeoPixel tokenizer: SentencePiece + added tokens, chat templates and answer parsing.

Reproduces the reference's slow ``InternLM2Tokenizer`` under transformers 4.33 exactly
(ARCHITECTURE.md §7):

* Added tokens (``[SEG]``, ``<p>``, ``</p>`` and the six ``<|...|>`` chat tokens) are cut out of
  the text first and the text on **both** sides of them is whitespace-stripped; ``<s>``, ``</s>``
  and ``<unk>`` are cut out without stripping. ``[UNUSED_TOKEN_145/146]`` are ordinary
  SentencePiece user-defined pieces (SentencePiece matches them itself).
* Decoding joins added tokens and SentencePiece runs with single spaces; inside a run, ``<s>``,
  ``</s>`` and ``<unk>`` get a space in front unless the previous token was one of them, and the
  run goes through transformers' ``clean_up_tokenization`` (``" ."`` -> ``"."`` ...).
  ``skip_special_tokens`` drops ``<s>``, ``</s>``, ``<unk>`` and the six chat tokens but keeps
  ``[SEG]``, ``<p>``, ``</p>`` (added as ordinary tokens).

Prompt layouts (§5): inference ``[BOS] + image + chat prompt``; training ``image + [BOS] +
conversation + </s>`` with ``mask_human_targets`` labels. Image positions are written as
``IMAGE_TOKEN_ID`` (-1) in the id layouts, as in the golden fixtures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from geopixel.result import Phrase
from geopixel.result import strip_markers as strip_markers  # re-exported: the one implementation

IM_START = "[UNUSED_TOKEN_146]"  # plays <|im_start|>; SentencePiece piece 92543
IM_END = "[UNUSED_TOKEN_145]"  # plays <|im_end|>; SentencePiece piece 92542
SEG_TOKEN, BOP_TOKEN, EOP_TOKEN = "[SEG]", "<p>", "</p>"
IMAGE_TOKEN_ID = -1  # placeholder id of an image-embedding position in id layouts
IGNORE_INDEX = -100  # label of a position without loss

GCG_QUERY = (
    "Can you provide a thorough description of this image? Please output with interleaved "
    "segmentation masks for the corresponding phrases."
)
RRSIS_TEMPLATE = "Could you provide a segmentation mask for {} in this image?"
RES_ANSWER = "Sure, it is [SEG]."

CHAT_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
)
# ARCHITECTURE.md §7: ids used when the checkpoint carries no added_tokens.json.
FALLBACK_ADDED_TOKENS: dict[str, int] = {
    **{tok: 92544 + i for i, tok in enumerate(CHAT_SPECIAL_TOKENS)},
    SEG_TOKEN: 92550,
    BOP_TOKEN: 92551,
    EOP_TOKEN: 92552,
}
_SP_SPECIALS = ("<s>", "</s>", "<unk>")  # in the SentencePiece vocab, declared lstrip/rstrip False
_PHRASE_RE = re.compile(r"<p>(.*?)</p>\s*\[SEG\]")  # chat.py:85


def clean_up_tokenization(text: str) -> str:
    """Apply transformers 4.33 ``clean_up_tokenization`` (``" ."`` -> ``"."``, ``" ,"`` -> ``","`` ...)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def chat_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    r"""Inference chat string (``interleav_wrap_chat``, no system block).

    Args:
        query: The user question.
        history: Earlier ``(question, answer)`` turns, oldest first.

    Returns:
        ``[UNUSED_TOKEN_146]user\n{q}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n`` preceded
        by one closed block per history turn.
    """
    turns = [f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}\n" for q, a in history]
    return "".join(turns) + f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"


def conversation_text(conversations: Sequence[Mapping[str, str]]) -> str:
    r"""Training string of a GeoPixelD record (``conv2text``, ``data_mix.py``).

    Args:
        conversations: Turns ``{"from": "human"|"user"|<other = assistant>, "value": str}``.

    Returns:
        Concatenated turns, each value stripped and closed by ``[UNUSED_TOKEN_145]\n``, plus ``</s>``.
    """
    out = []
    for turn in conversations:
        role = "user" if turn["from"].lower() in ("human", "user") else "assistant"
        out.append(f"{IM_START}{role}\n{turn['value'].strip()}{IM_END}\n")
    return "".join(out) + "</s>"


def mask_human_targets(input_ids: Sequence[int], *, im_end_id: int = 92542, eos_id: int = 2) -> list[int]:
    r"""Training labels of one sequence (``mask_human_targets``, reference ``xc2.py:393-421``).

    Scanning left to right, every even-numbered ``im_end_id`` (end of a user turn) masks from the
    last answer end up to and including the 5 tokens after it (the ``\n[UNUSED_TOKEN_146]assistant\n``
    header); every odd one (end of an answer) records the position after it; everything after the
    first ``eos_id`` is masked. Without an eos and after an even count, everything after the last
    answer's ``[UNUSED_TOKEN_145]\n`` is masked.

    Args:
        input_ids: Token ids with image positions already set to any id that is neither
            ``im_end_id`` nor ``eos_id`` (they are covered by the first user-turn mask).
        im_end_id: Id of ``[UNUSED_TOKEN_145]``.
        eos_id: Id of ``</s>``.

    Returns:
        Labels: the ids where supervised, ``IGNORE_INDEX`` elsewhere.
    """
    targets = list(input_ids)
    end_count, last_eoa, tid = 0, 0, None
    for i, tid in enumerate(input_ids):
        if tid == im_end_id:
            if end_count % 2 == 0:
                stop = min(i + 6, len(targets))
                targets[last_eoa:stop] = [IGNORE_INDEX] * max(stop - last_eoa, 0)
            else:
                last_eoa = i + 1
            end_count += 1
        elif tid == eos_id:
            targets[i + 1 :] = [IGNORE_INDEX] * (len(targets) - i - 1)
            break
    if tid != eos_id and end_count % 2 == 0:
        targets[last_eoa + 1 :] = [IGNORE_INDEX] * max(len(targets) - last_eoa - 1, 0)
    return targets


def clean_response(text: str) -> str:
    r"""The reference ``evaluate`` answer: remove the literal ``[UNUSED_TOKEN_145]``.

    Args:
        text: ``decode(generated_ids, skip_special_tokens=True)``.

    Returns:
        The text with every ``[UNUSED_TOKEN_145]`` deleted (a trailing ``\n`` stays).
    """
    return text.replace(IM_END, "")


def parse_phrases(text: str, *, n_masks: int | None = None) -> list[Phrase]:
    r"""Grounded phrases ``<p> phrase </p> [SEG]`` of an answer, in order.

    Uses the reference rule ``<p>(.*?)</p>\s*\[SEG\]`` (``.`` does not cross newlines). A
    phrase's ``mask_index`` is the rank of its ``[SEG]`` among **all** ``[SEG]`` in ``text`` (masks
    are produced one per ``[SEG]``, in order), so a ``[SEG]`` without a phrase (e.g. the RES answer
    ``Sure, it is [SEG] .``) still owns mask 0 and simply has no ``Phrase``: the list is then
    empty. ``mask_index`` is -1 when ``n_masks`` is given and the rank is not below it (e.g. a
    ``[SEG]`` generated as the very last token gets no mask).

    Args:
        text: Decoded answer (``clean_response`` output).
        n_masks: Number of masks produced, if known.

    Returns:
        Phrases with stripped text and offsets of that stripped text in ``text``.
    """
    phrases = []
    for match in _PHRASE_RE.finditer(text):
        raw = match.group(1)
        start = match.start(1) + (len(raw) - len(raw.lstrip()))
        stripped = raw.strip()
        mask_index = text.count(SEG_TOKEN, 0, match.end()) - 1
        if n_masks is not None and mask_index >= n_masks:
            mask_index = -1
        phrases.append(Phrase(text=stripped, start=start, end=start + len(stripped), mask_index=mask_index))
    return phrases


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class GeoPixelTokenizer:
    """GeoPixel's tokenizer (transformers-4.33 ``InternLM2Tokenizer`` semantics, §7).

    Args:
        sp_model: Loaded SentencePiece model (92,544 pieces for GeoPixel).
        added_tokens: Added token -> id (ids at and above the SentencePiece size).
        special_added: Added tokens that are *special* (removed by ``skip_special_tokens``).
        strip_flags: Per no-split token, ``(lstrip, rstrip)``: whether the text left / right of it
            is whitespace-stripped. Tokens not listed strip both sides (plain-string added tokens).
    """

    def __init__(
        self,
        sp_model: spm.SentencePieceProcessor,
        *,
        added_tokens: Mapping[str, int] = FALLBACK_ADDED_TOKENS,
        special_added: Sequence[str] = CHAT_SPECIAL_TOKENS,
        strip_flags: Mapping[str, tuple[bool, bool]] | None = None,
    ) -> None:
        self.sp = sp_model
        self.added_tokens = dict(added_tokens)
        self._added_decoder = {i: t for t, i in self.added_tokens.items()}
        flags = {t: (False, False) for t in _SP_SPECIALS} if strip_flags is None else dict(strip_flags)
        self._strip = {t: flags.get(t, (True, True)) for t in (*self.added_tokens, *_SP_SPECIALS)}
        self._split_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self._strip, key=len, reverse=True)) + ")"
        )
        self._special_ids = {self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()}
        self._special_ids |= {self.added_tokens[t] for t in special_added if t in self.added_tokens}
        self._sp_special_pieces = {self.sp.id_to_piece(i) for i in self._special_ids if i < self.sp_size}

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, model_path: str | Path) -> GeoPixelTokenizer:
        """Tokenizer from a bare ``tokenizer.model`` with the documented added-token ids (§7)."""
        return cls(spm.SentencePieceProcessor(model_file=str(model_path)))

    @classmethod
    def from_dir(cls, path: str | Path) -> GeoPixelTokenizer:
        """Tokenizer from a checkpoint directory.

        Reads ``tokenizer.model``, and ``added_tokens.json`` / ``special_tokens_map.json`` when
        present (falling back to the ids 92544..92552 and the six chat special tokens).

        Args:
            path: Directory holding at least ``tokenizer.model``.

        Returns:
            The tokenizer.
        """
        root = Path(path)
        sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
        added = _read_json(root / "added_tokens.json") or FALLBACK_ADDED_TOKENS
        smap = _read_json(root / "special_tokens_map.json")
        if smap is None:
            return cls(sp, added_tokens=added)
        extra = smap.get("additional_special_tokens", [])
        special = [t if isinstance(t, str) else t["content"] for t in extra]
        flags: dict[str, tuple[bool, bool]] = {}
        for value in smap.values():
            for tok in value if isinstance(value, list) else [value]:
                if isinstance(tok, dict):  # AddedToken: honour its flags; plain strings strip both
                    flags.setdefault(tok["content"], (bool(tok["lstrip"]), bool(tok["rstrip"])))
        return cls(sp, added_tokens=added, special_added=special, strip_flags=flags)

    # ---- ids --------------------------------------------------------------------------------

    @property
    def sp_size(self) -> int:
        """Number of SentencePiece pieces (92,544)."""
        return int(self.sp.get_piece_size())

    def __len__(self) -> int:
        return max(self.sp_size, max(self._added_decoder, default=-1) + 1)

    @property
    def bos_id(self) -> int:
        """``<s>`` (1)."""
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        """``</s>`` (2), the only generation stop id (§8.1)."""
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        """Padding id = ``<unk>`` (0)."""
        return int(self.sp.unk_id())

    @property
    def seg_id(self) -> int:
        """``[SEG]`` (92550)."""
        return self.added_tokens[SEG_TOKEN]

    @property
    def bop_id(self) -> int:
        """``<p>`` (92551)."""
        return self.added_tokens[BOP_TOKEN]

    @property
    def eop_id(self) -> int:
        """``</p>`` (92552)."""
        return self.added_tokens[EOP_TOKEN]

    @property
    def im_start_id(self) -> int:
        """``[UNUSED_TOKEN_146]`` (92543), the turn opener (not the unused ``<|im_start|>``)."""
        return int(self.sp.piece_to_id(IM_START))

    @property
    def im_end_id(self) -> int:
        """``[UNUSED_TOKEN_145]`` (92542), the turn closer (not the unused ``<|im_end|>``)."""
        return int(self.sp.piece_to_id(IM_END))

    def token_to_id(self, token: str) -> int:
        """Id of an added token or SentencePiece piece (``<unk>``'s id when unknown)."""
        return self.added_tokens[token] if token in self.added_tokens else int(self.sp.piece_to_id(token))

    def id_to_token(self, token_id: int) -> str:
        """Added token or SentencePiece piece of an id."""
        if token_id in self._added_decoder:
            return self._added_decoder[token_id]
        if not 0 <= token_id < self.sp_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {len(self)}")
        return str(self.sp.id_to_piece(token_id))

    # ---- encode -----------------------------------------------------------------------------

    def _segments(self, text: str) -> list[str]:
        """Split on no-split tokens and strip neighbours (4.33 ``PreTrainedTokenizer.tokenize``)."""
        parts = [p for p in self._split_re.split(text) if p]
        for i, part in enumerate(parts):
            if part not in self._strip:
                continue
            lstrip, rstrip = self._strip[part]
            if rstrip and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if lstrip and i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
        return [p for p in parts if p]

    def tokenize(self, text: str, *, add_bos: bool) -> list[str]:
        """Token strings (pieces and added tokens), as ``tokenizer.convert_ids_to_tokens(encode)``."""
        return [self.id_to_token(i) for i in self.encode(text, add_bos=add_bos)]

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        """Token ids of ``text`` (``tokenizer(text, add_special_tokens=add_bos).input_ids``).

        Args:
            text: Any string; added tokens and ``<s>``/``</s>``/``<unk>`` written in it are mapped
                to their ids.
            add_bos: Prepend one ``<s>``.

        Returns:
            The ids.
        """
        ids = [self.bos_id] if add_bos else []
        for part in self._segments(text):
            if part in self._strip:
                ids.append(self.token_to_id(part))
            else:
                ids.extend(int(i) for i in self.sp.encode(part, out_type=int))
        return ids

    # ---- decode -----------------------------------------------------------------------------

    def _run_to_string(self, pieces: list[str]) -> str:
        """``InternLM2Tokenizer.convert_tokens_to_string`` of a run of SentencePiece pieces."""
        out, prev_special = "", False
        sub: list[str] = []
        for piece in pieces:
            if piece in self._sp_special_pieces:
                out += ("" if prev_special else " ") + self.sp.decode_pieces(sub) + piece
                sub, prev_special = [], True
            else:
                sub.append(piece)
                prev_special = False
        return clean_up_tokenization(out + self.sp.decode_pieces(sub))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``ids`` as 4.33's ``tokenizer.decode(ids, skip_special_tokens=...)``.

        Args:
            ids: Token ids (< ``len(self)``).
            skip_special_tokens: Drop ``<s>``, ``</s>``, ``<unk>`` and the six chat tokens
                (``[SEG]``, ``<p>``, ``</p>``, ``[UNUSED_TOKEN_145/146]`` stay).

        Returns:
            The text; added tokens are separated from their neighbours by single spaces.
        """
        texts: list[str] = []
        run: list[str] = []
        for token_id in (int(i) for i in ids):
            if skip_special_tokens and token_id in self._special_ids:
                continue
            token = self.id_to_token(token_id)
            if token_id in self._added_decoder:
                if run:
                    texts.append(self._run_to_string(run))
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self._run_to_string(run))
        return " ".join(texts)

    def response_text(self, generated_ids: Sequence[int]) -> str:
        """The reference ``evaluate`` answer text of generated ids (skip special, drop IM_END)."""
        return clean_response(self.decode(generated_ids, skip_special_tokens=True))

    # ---- prompts ----------------------------------------------------------------------------

    def inference_prompt_ids(self, query: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Ids of the chat prompt (no BOS; the model puts ``[BOS] + image`` in front)."""
        return self.encode(chat_prompt(query, history), add_bos=False)

    def inference_layout(
        self, n_image_tokens: int, query: str, history: Sequence[tuple[str, str]] = ()
    ) -> list[int]:
        """Inference sequence ``[BOS] + image + prompt`` with ``IMAGE_TOKEN_ID`` at image positions.

        Equals the golden ``input_ids_layout`` of ``interleav_wrap_chat`` (§5.1); the image
        embeddings occupy positions ``1 .. n_image_tokens``.
        """
        return [self.bos_id] + [IMAGE_TOKEN_ID] * n_image_tokens + self.inference_prompt_ids(query, history)

    def answer_ids(self, answer: str) -> list[int]:
        r"""Answer ids as in the training string: ``answer + "[UNUSED_TOKEN_145]\n</s>"`` (no BOS)."""
        return self.encode(answer + IM_END + "\n</s>", add_bos=False)

    def training_example(
        self, conversations: Sequence[Mapping[str, str]], n_image_tokens: int
    ) -> tuple[list[int], list[int]]:
        """Training layout ``image + [BOS] + conversation + </s>`` and its labels (§5.2).

        Args:
            conversations: GeoPixelD turns ``{"from", "value"}``.
            n_image_tokens: Number of image embeddings (0 for a text-only record).

        Returns:
            ``(input_ids, labels)``: ``input_ids`` has ``IMAGE_TOKEN_ID`` at image positions;
            ``labels`` is ``IGNORE_INDEX`` at image positions and wherever
            ``mask_human_targets`` masks (same length, unshifted).
        """
        text_ids = self.encode(conversation_text(conversations), add_bos=True)
        input_ids = [IMAGE_TOKEN_ID] * n_image_tokens + text_ids
        labels = mask_human_targets(
            [IGNORE_INDEX] * n_image_tokens + text_ids, im_end_id=self.im_end_id, eos_id=self.eos_id
        )
        return input_ids, labels
