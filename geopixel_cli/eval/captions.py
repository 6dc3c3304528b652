"""Caption metrics exactly as pycocoevalcap 1.2 computes them, without its all-in-one ``evaluate``.

* Tokenisation: the Stanford CoreNLP 3.4.1 PTB tokenizer jar that pycocoevalcap ships, run with
  the same flags (``-preserveLines -lowerCase``) and the same punctuation filter. The temporary
  input file goes to a private temp directory rather than next to the jar (same output; works
  when site-packages is read-only).
* METEOR: pycocoevalcap's own ``Meteor`` wrapper around ``meteor-1.5.jar``; the reported score
  is METEOR's corpus aggregate. The Java process is started once per Python process and reused
  (it spends ~10 s loading its paraphrase table).
* CIDEr (the CIDEr-D variant), BLEU-1..4 and ROUGE-L: pycocoevalcap's pure-Python scorers.

SPICE is never called: it downloads CoreNLP models at first use.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geopixel_cli.eval.errors import EvalError

# pycocoevalcap's ptbtokenizer.PUNCTUATIONS (brackets in upper case: the lower-cased tokenizer
# output "-lrb-" therefore survives, a quirk the reference numbers include).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_METEOR: Any = None


@dataclass
class CaptionScores:
    """Corpus and per-image caption metrics.

    Attributes:
        cider: CIDEr-D on pycocoevalcap's scale (x10), mean over images.
        meteor: METEOR 1.5 corpus aggregate.
        other: BLEU-1..4 and ROUGE-L (``Bleu_1`` ... ``ROUGE_L``), corpus values.
        per_image_cider: Image id -> CIDEr of that image (within this corpus).
        per_image_meteor: Image id -> METEOR segment score.
    """

    cider: float
    meteor: float
    other: dict[str, float] = field(default_factory=dict)
    per_image_cider: dict[str, float] = field(default_factory=dict)
    per_image_meteor: dict[str, float] = field(default_factory=dict)


def _package_dir(sub: str) -> Path:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise EvalError("pycocoevalcap is not installed; it carries the caption scorers' jars") from exc
    return Path(ptb.__file__).resolve().parent.parent / sub


def ptb_tokenize(captions: dict[str, str]) -> dict[str, str]:
    """Tokenise one caption per image with pycocoevalcap's PTB tokenizer settings.

    Args:
        captions: Image id -> raw caption, in the order to feed the tokenizer.

    Returns:
        Image id -> space-joined lower-cased tokens with punctuation tokens dropped.

    Raises:
        EvalError: Java is missing or the tokenizer fails.
    """
    if not captions:
        return {}
    jar = _package_dir("tokenizer") / "stanford-corenlp-3.4.1.jar"
    ids = list(captions)
    sentences = "\n".join(captions[k].replace("\n", " ") for k in ids)
    with tempfile.TemporaryDirectory(prefix="geopixel-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes(sentences.encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
        cmd += ["-preserveLines", "-lowerCase", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise EvalError("java not found on PATH: the PTB tokenizer and METEOR need Java 8+") from exc
    if proc.returncode != 0:
        raise EvalError(f"PTB tokenizer failed: {proc.stderr.decode(errors='replace').strip()[:500]}")
    lines = proc.stdout.decode().split("\n")
    out: dict[str, str] = {}
    for k, line in zip(ids, lines, strict=False):
        out[k] = " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
    for k in ids[len(out) :]:  # a trailing empty caption yields no output line
        out[k] = ""
    return out


def _meteor() -> Any:
    """The process-wide METEOR scorer (one JVM, started on first use)."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            _METEOR = Meteor()
        except FileNotFoundError as exc:
            raise EvalError("java not found on PATH: METEOR needs Java 8+") from exc
        atexit.register(close_meteor)
    return _METEOR


def close_meteor() -> None:
    """Stop the METEOR Java process if one is running."""
    global _METEOR
    if _METEOR is not None:
        proc = _METEOR.meteor_p
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        _METEOR.meteor_p = _NoProcess()  # its __del__ then has nothing left to stop
        _METEOR = None


class _NoProcess:
    """Stand-in for a stopped process so pycocoevalcap's ``Meteor.__del__`` is a no-op."""

    class _Closed:
        def close(self) -> None:
            """Nothing to close."""

    stdin = _Closed()

    def kill(self) -> None:
        """Nothing to kill."""

    def wait(self) -> int:
        """Nothing to wait for."""
        return 0


def _run_meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    scorer = _meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    except (BrokenPipeError, ValueError) as exc:
        proc = scorer.meteor_p
        proc.kill()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""  # EOF: the JVM is gone
        if scorer.lock.locked():  # compute_score has no try/finally; its __del__ would block on the lock
            scorer.lock.release()
        close_meteor()
        raise EvalError(f"METEOR failed: {exc} {err.strip()[:500]}") from exc
    return float(score), [float(s) for s in scores]


def score_captions(references: dict[str, str], hypotheses: dict[str, str]) -> CaptionScores:
    """Score captions as a corpus the way GLaMM's call of ``COCOEvalCap`` does (minus SPICE).

    References and hypotheses are tokenised in two separate tokenizer runs, as there. CIDEr's
    IDF comes from the references of exactly these images.

    Args:
        references: Image id -> GT caption (one per image). Its order is the scoring order.
        hypotheses: Image id -> predicted caption; same keys.

    Returns:
        The corpus and per-image scores.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(references)
    if set(ids) != set(hypotheses):
        raise EvalError("caption references and hypotheses cover different images")
    if not ids:
        return CaptionScores(cider=0.0, meteor=0.0)
    ref_tok = ptb_tokenize(references)
    hyp_tok = ptb_tokenize({k: hypotheses[k] for k in ids})
    gts = {k: [ref_tok[k]] for k in ids}
    res = {k: [hyp_tok[k]] for k in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    meteor, meteor_each = _run_meteor(gts, res)
    other = {f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)}
    other["ROUGE_L"] = float(rouge)
    return CaptionScores(
        cider=float(cider),
        meteor=meteor,
        other=other,
        per_image_cider={k: float(v) for k, v in zip(ids, cider_each, strict=True)},
        per_image_meteor=dict(zip(ids, meteor_each, strict=True)),
    )


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH."""
    return any((Path(p) / "java").is_file() for p in os.environ.get("PATH", "").split(os.pathsep) if p)
