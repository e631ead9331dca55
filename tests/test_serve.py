"""`cfr serve`'s model holder: audited swaps that no failure of one category can stop.

The real server over HTTP, on a registry the pipeline wrote, is tested in
tests/test_pipeline.py; here the registry and the audit are stand-ins, so that every
failure can be produced on purpose.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import cfr_core.audit
from cfr_core.serve import LiveModel, ModelHolder


class Registry:
    def __init__(self, rows: dict):
        self.rows = rows

    def categories(self):
        if isinstance(self.rows, Exception):
            raise self.rows
        return sorted(self.rows)

    def deployed(self, category):
        row = self.rows[category]
        if isinstance(row, Exception):
            raise row
        return row


def row(version: int, digest: str) -> SimpleNamespace:
    return SimpleNamespace(version=version, model_hash=digest, model_path=f"/m/{digest}")


@pytest.fixture
def holder(monkeypatch):
    audits: list[str] = []

    def audit(record, registry):
        audits.append(record.model_hash)
        if record.model_hash == "crash":
            raise IndexError("tuple index out of range")  # e.g. a hand-edited model_path
        ok = record.model_hash != "forged"
        return SimpleNamespace(
            ok=ok, checks=[("model folder = registry hash", ok, "" if ok else "differs")]
        )

    def load(self, category, version, folder, audit_text):
        return LiveModel(category, version, folder.rsplit("/", 1)[-1], folder, None, None, "", "")

    monkeypatch.setattr(cfr_core.audit, "audit", audit)
    monkeypatch.setattr(ModelHolder, "_load", load)
    h = ModelHolder(registry=Registry({"dome": row(1, "d1"), "ribbed": row(1, "r1")}))
    h.audits = audits
    return h


def test_only_audited_versions_answer_and_a_refusal_keeps_the_live_model(holder):
    holder.refresh()
    assert {c: m.model_hash for c, m in holder.snapshot()[0].items()} == {
        "dome": "d1",
        "ribbed": "r1",
    }
    holder.registry.rows["dome"] = row(2, "forged")
    notes = holder.refresh()
    assert holder.get("dome").model_hash == "d1"  # still the audited version 1
    assert "version 2 refused: its audit failed" in holder.snapshot()[1]["dome"]
    assert any("version 1 answers" in n for n in notes)
    holder.registry.rows["dome"] = row(3, "d3")
    holder.refresh()
    assert holder.get("dome").version == 3 and "dome" not in holder.snapshot()[1]


def test_a_refused_version_is_not_audited_again_until_its_row_changes(holder):
    holder.refresh()
    holder.registry.rows["dome"] = row(2, "forged")
    for _ in range(3):
        holder.refresh()
    assert holder.audits.count("forged") == 1
    holder.registry.rows["dome"] = row(1, "d1")  # rolled back to what answers
    holder.refresh()
    assert "dome" not in holder.snapshot()[1] and holder.audits.count("d1") == 1


def test_one_category_failing_in_any_way_never_stops_the_others(holder):
    holder.registry.rows = {
        "aaa": row(1, "crash"),  # the audit itself raises
        "bbb": RuntimeError("database is locked"),  # the registry row cannot be read
        "ribbed": row(1, "r1"),
    }
    notes = holder.refresh()
    live, refused = holder.snapshot()
    assert set(live) == {"ribbed"}
    assert "IndexError" in refused["aaa"] and "RuntimeError" in refused["bbb"]
    assert len(notes) == 3
    holder.registry.rows = OSError("the registry is gone")
    notes = holder.refresh()
    assert notes == [
        "the registry cannot be read (OSError: the registry is gone); the live models keep "
        "answering"
    ]
    assert set(holder.snapshot()[0]) == {"ribbed"}


def test_a_model_that_fails_while_scoring_answers_one_json_line(holder, monkeypatch, tmp_path):
    """Not the part's fault (a DataError is a 422): the service still answers JSON, names
    the category and points at the audit."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    import cfr_core.engine.score
    from cfr_core.data.io import write_xyz
    from cfr_core.serve import create_app

    holder.refresh()

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cfr_core.engine.score, "score_arrays", broken)
    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(png, format="PNG")
    write_xyz(tmp_path / "a.tiff", np.full((40, 40, 3), 0.3, np.float32))
    client = TestClient(create_app(holder))
    r = client.post(
        "/v1/categories/dome/score",
        files={
            "rgb": ("a.png", png.getvalue()),
            "xyz": ("a.tiff", (tmp_path / "a.tiff").read_bytes()),
        },
    )
    assert r.status_code == 500
    assert r.json() == {
        "error": "the dome model could not score this part (RuntimeError: mat1 and mat2 "
        "shapes cannot be multiplied); audit the deployment with `cfr audit`"
    }


def test_at_most_two_parts_are_decoded_and_scored_at_once(holder, monkeypatch):
    """Small uploads can decode large (a compressed cloud of zeros): however many requests
    arrive together, only two hold a decoded scan; the others wait their turn and are
    answered."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    import cfr_core.serve
    from cfr_core.serve import create_app

    holder.refresh()
    lock, running, peak = threading.Lock(), [0], [0]

    def slow(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return {"verdict": "PASS"}

    monkeypatch.setattr(cfr_core.serve, "score_upload", slow)
    client = TestClient(create_app(holder))
    files = {"rgb": ("a.png", b"x"), "xyz": ("a.tiff", b"y")}
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda _: client.post("/v1/categories/dome/score", files=files), range(6))
        )
    assert [a.status_code for a in answers] == [200] * 6
    assert peak[0] == 2
