"""PubMedQA's records from wherever they come (the hub, the official data/ directory, an original-layout
or HF-layout file), every file of a source read and compared with the others, and validated."""
from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medqa.decisions.answer_format import DECISIONS
from medqa.errors import PipelineError

if TYPE_CHECKING:
    from medqa.params import DataParams

log = logging.getLogger(__name__)

ORIGINAL_FILE = "ori_pqal.json"
TEST_FILE = "test_ground_truth.json"

Record = dict[str, Any]


# --- loading -------------------------------------------------------------------------------

def _from_original(pmid: str, raw: dict) -> Record:
    """One record of PubMedQA's original layout (ori_pqal.json) in the normalised layout."""
    return {
        "pmid": str(pmid),
        "question": raw.get("QUESTION"),
        "contexts": raw.get("CONTEXTS"),
        "long_answer": raw.get("LONG_ANSWER"),
        "final_decision": raw.get("final_decision"),
    }


def _from_hf(raw: dict) -> Record:
    """One record of the Hugging Face layout (pubid, question, context{contexts}, ...)."""
    context = raw.get("context")
    contexts = context.get("contexts") if isinstance(context, dict) else context
    if hasattr(contexts, "tolist"):  # numpy arrays from parquet
        contexts = contexts.tolist()
    return {
        "pmid": str(raw.get("pubid", raw.get("pmid"))),
        "question": raw.get("question"),
        "contexts": contexts,
        "long_answer": raw.get("long_answer"),
        "final_decision": raw.get("final_decision"),
    }


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys must be unique: json.load would keep the last duplicate silently."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise PipelineError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def looks_like(path: Path) -> str:
    """What a data file's first bytes say it is, whatever its name says: for the line that tells a user
    the file's name and content disagree."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return "unreadable"
    if head.startswith(b"PAR1"):
        return "a Parquet file (.parquet)"
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and all(line.startswith("{") for line in lines[:-1]) and lines[0].endswith("}"):
        return "JSON lines, one record a line (.jsonl)"
    if text.startswith(("{", "[")):
        return "one JSON document (.json)"
    if b"\0" in head:
        return "binary data"
    return f"text beginning {text[:40]!r}"


def _read_text(path: Path) -> str:
    """The file's text; one line naming the byte offset where it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path} is not UTF-8 text: byte offset {exc.start} ({exc.object[exc.start:exc.start + 1]!r}"
                            f") is {exc.reason}; it looks like {looks_like(path)}: re-save it as UTF-8, or name it "
                            "for its format") from exc
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror}") from exc


ORIGINAL_FIELDS = ("QUESTION", "CONTEXTS", "LONG_ANSWER", "final_decision")


def _is_original_layout(data: object) -> bool:
    """{pmid: record} with records in the original layout's fields; any one field of any record is
    enough to tell, so that one incomplete record is reported as such, not as an unknown layout."""
    return (isinstance(data, dict) and bool(data) and all(isinstance(v, dict) for v in data.values())
            and any(field in v for v in data.values() for field in ORIGINAL_FIELDS))


def _read_json_file(path: Path) -> object:
    text = _read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except PipelineError as exc:  # a duplicated pmid in ori_pqal.json, or a duplicated field
        raise PipelineError(f"{path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}; it looks like "
                            f"{looks_like(path)}") from exc


READ_FORMATS = ("a directory with ori_pqal.json (and test_ground_truth.json), a .json file (the original "
                "layout or a list of records), .jsonl, .parquet, or a hub reference .yaml")


def _load_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow's ArrowInvalid and kin: the bytes are not Parquet
            raise PipelineError(f"{path} is not a Parquet file ({type(exc).__name__}); it looks like "
                                f"{looks_like(path)}: name it for its format") from None
        return [_from_hf(r) for r in frame.to_dict("records")]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines: U+2028 is not a JSONL line end
            if line.strip():
                try:
                    rows.append(_from_hf(json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise PipelineError(f"{path} line {n} is not valid JSON: {exc.msg}; the file looks like "
                                        f"{looks_like(path)}") from exc
        return rows
    data = _read_json_file(path)
    if _is_original_layout(data):
        return [_from_original(k, v) for k, v in data.items()]
    if isinstance(data, list):
        return [_from_hf(r) for r in data]
    raise PipelineError(
        f"{path} is in no known PubMedQA layout: expected the original {{pmid: {{QUESTION, CONTEXTS, "
        "LONG_ANSWER, final_decision}}}} or a list of records with pubid/question/context/long_answer/"
        "final_decision"
    )


def _load_hub(dataset: str, config: str, revision: str | None = None) -> list[Record]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset, config, split="train", revision=revision)
    except Exception as exc:  # the hub raises many kinds; all mean the same to the user
        raise PipelineError(
            f"could not load {dataset} ({config}) from the Hugging Face hub: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "If you are offline, point data.source at a local copy of PubMedQA, e.g. "
            "`make run DATA=/path/to/pubmedqa/data` or `dvc exp run -S data.source=/path/to/pubmedqa/data` "
            f"(a directory with {ORIGINAL_FILE} and {TEST_FILE}, or one data file)."
        ) from exc
    return [_from_hf(r) for r in ds]


def is_hub_reference(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml")


def read_hub_reference(path: Path) -> dict[str, str]:
    """A hub reference file: `dataset`, `config` and optionally `revision` of a PubMedQA copy on the hub."""
    import yaml

    try:
        ref = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"data.source {path}: cannot read the hub reference: {exc}") from exc
    if not isinstance(ref, dict) or not ref.get("dataset") or not ref.get("config"):
        raise PipelineError(f"data.source {path}: a hub reference needs `dataset` and `config` keys")
    return {k: str(v) for k, v in ref.items() if v is not None}


def check_source(source: str) -> Path:
    """The file `source` names (a data file, the official directory's ori_pqal.json, or a hub
    reference), or a PipelineError saying what is missing or which formats are read. Cheap: reads
    nothing (check_params calls it)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise PipelineError(
            f"data.source {path} does not exist (a local PubMedQA copy, or a hub reference file like "
            "data/pubmedqa-hub.yaml)"
        )
    if path.is_dir():
        if not (path / ORIGINAL_FILE).exists():
            raise PipelineError(f"data.source {path} is a directory without {ORIGINAL_FILE}")
        return path / ORIGINAL_FILE
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".parquet") and not is_hub_reference(path):
        raise PipelineError(f"data.source {path}: {'a ' + suffix if suffix else 'a file without a suffix'} is not "
                            f"read; data.source can be {READ_FORMATS}")
    return path


def load_records(source: str) -> list[Record]:
    """Load PubMedQA from the hub (`source` is a hub reference .yaml), a data file, or an official data/ directory."""
    path = check_source(source)
    if is_hub_reference(path):
        ref = read_hub_reference(path)
        return _load_hub(ref["dataset"], ref["config"], ref.get("revision"))
    return _load_file(path)


def _test_labels(raw: dict) -> dict[str, str]:
    """{pmid: decision} with string ids and normalised decisions, whichever place it came from."""
    return {str(k): _normal_decision(v) for k, v in raw.items()}


def read_official_labels(path: Path) -> dict[str, str]:
    """An official-format file, {pmid: decision} (PubMedQA's test_ground_truth.json, or the eval stages'
    `<model>_official.json`), with string ids and normalised decisions."""
    return _test_labels(_read_json_file(Path(path).expanduser()))


def test_labels_location(source: str, url: str | None) -> str | None:
    """Where the official test split's labels come from: the source directory's test_ground_truth.json,
    else `url` (a local path or an address); None when there is neither."""
    local = Path(source).expanduser() / TEST_FILE
    if Path(source).expanduser().is_dir() and local.exists():
        return str(local)
    return url or None


def load_test_labels(source: str, url: str | None) -> dict[str, str] | None:
    """The official test split {pmid: decision}: from the source directory, else from `url`.

    Returns None (with a warning) when neither is reachable; the split stage then explains.
    """
    where = test_labels_location(source, url)
    if where is None:
        return None
    if Path(where).expanduser().exists():
        return read_official_labels(Path(where))
    try:
        with urllib.request.urlopen(where, timeout=30) as resp:
            return _test_labels(json.load(resp))
    except Exception as exc:
        log.warning("could not fetch the official test split from %s (%s)", where, exc)
        return None


def check_test_labels(records: list[Record], labels: dict[str, str], records_from: str, labels_from: str) -> None:
    """The official test split's labels against the records they name (validated, so normalised): a
    label that is no decision, or that disagrees with its record's, is one line naming the record, both
    files and both values (a copy that was edited, or mixed from two versions)."""
    decisions = {r["pmid"]: r["final_decision"] for r in records}
    for pmid, label in labels.items():
        if label not in DECISIONS:
            raise PipelineError(f"{labels_from}: record {pmid}: the label is {label!r}, expected one of "
                                f"{', '.join(DECISIONS)}")
        if pmid in decisions and decisions[pmid] != label:
            raise PipelineError(
                f"record {pmid}: {records_from} says final_decision {decisions[pmid]!r}, {labels_from} says "
                f"{label!r}: the two files disagree (an edited copy, or two versions mixed); take both from one "
                "PubMedQA release"
            )


def load_source(source: str, test_ids: str | None) -> tuple[list[Record], dict[str, str]]:
    """A data source's records (validated) and its official test labels ({} when it has none), read as
    a whole: the labels agree with the records they name (`check_test_labels`)."""
    records = validate_records(load_records(source), f"data.source {source}")
    labels = load_test_labels(source, test_ids) or {}
    check_test_labels(records, labels, str(check_source(source)), str(test_labels_location(source, test_ids)))
    return records, labels


# --- validation ----------------------------------------------------------------------------

def _normal_decision(value: object) -> object:
    """" Yes" -> "yes": the decision's case and surrounding spaces carry no meaning."""
    return value.strip().lower() if isinstance(value, str) else value


def validate_records(records: list[Record], source: str = "the data source") -> list[Record]:
    """Check ids are unique and every field is present and sane; normalise the decision's case and
    spacing; return the records sorted by pmid. Errors name `source`, the record and the field."""
    if not records:
        raise PipelineError(f"{source} holds no records")
    seen: set[str] = set()
    for r in records:
        pmid = r["pmid"]
        if not pmid or pmid == "None":
            raise PipelineError(f"{source}: a record has no id (pubid/pmid): question {str(r.get('question'))[:60]!r}")
        if pmid in seen:
            raise PipelineError(f"{source}: record {pmid}: duplicate id")
        seen.add(pmid)
        for field in ("question", "long_answer"):
            if not isinstance(r[field], str) or not r[field].strip():
                raise PipelineError(f"{source}: record {pmid}: field '{field}' is missing or empty")
        contexts = r["contexts"]
        if not isinstance(contexts, list) or not any(isinstance(c, str) and c.strip() for c in contexts):
            raise PipelineError(f"{source}: record {pmid}: field 'contexts' is missing or empty")
        decision = _normal_decision(r["final_decision"])
        if decision not in DECISIONS:
            raise PipelineError(
                f"{source}: record {pmid}: field 'final_decision' is {r['final_decision']!r}, "
                f"expected one of {', '.join(DECISIONS)}"
            )
        r["final_decision"] = decision
    # Numeric PMIDs in numeric order, any others after them: a stable order whatever the source's.
    return sorted(records, key=lambda r: (0, int(r["pmid"]), "") if r["pmid"].isdigit() else (1, 0, r["pmid"]))


def read_local_source(data: DataParams) -> tuple[list[Record], dict[str, str]] | None:
    """`load_source` where reading the source and its test labels needs no network (a local copy with its
    labels beside it or at a local data.test_ids); None for a hub reference or labels at an address."""
    path = check_source(data.source)
    labels_at = test_labels_location(data.source, data.test_ids)
    if is_hub_reference(path) or (labels_at is not None and not Path(labels_at).expanduser().exists()):
        return None
    return load_source(data.source, data.test_ids)
