"""Several GGUF types in one pass: each block of the source is read once, and every output is exactly what a run of
its type alone writes, with its own manifest."""

import json

from typer.testing import CliRunner

import ideoquant
from ideoquant.cli import app
from ideoquant.publish.verify import verify
from ideoquant.source.tensors import SourceTensor


def _counting_reads(monkeypatch) -> list:
    reads = []
    real = SourceTensor.read

    def read(self, rows=None, *args, **kwargs):
        reads.append((self.name, rows))
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(SourceTensor, "read", read)
    return reads


def test_many_types_one_read_same_bytes(bf16_source, tmp_path, monkeypatch):
    reads = _counting_reads(monkeypatch)
    single = {}
    for t in ("q4_k_m", "q8_0", "q3_k"):
        before = len(reads)
        ideoquant.convert_gguf(bf16_source, tmp_path / t, qtype=t, threads=2)
        single[t] = len(reads) - before
    before = len(reads)
    r = CliRunner().invoke(app, ["gguf", str(bf16_source), "--out", str(tmp_path / "many"),
                                 "--type", "q4_k_m,q8_0,q3_k", "--threads", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert len(reads) - before == single["q8_0"] == single["q4_k_m"]  # one read of each block, not one per type
    manifests = json.loads(r.stdout)
    assert [m["gguf"]["label"] for m in manifests] == ["Q4_K_M", "Q8_0", "Q3_K"]
    for t, label in (("q4_k_m", "Q4_K_M"), ("q8_0", "Q8_0"), ("q3_k", "Q3_K")):
        folder = tmp_path / "many" / label
        alone = sorted(p.relative_to(tmp_path / t) for p in (tmp_path / t).rglob("*") if p.is_file())
        together = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
        assert alone == together
        for rel in alone:
            if rel.suffix == ".gguf":
                assert (folder / rel).read_bytes() == (tmp_path / t / rel).read_bytes(), rel
        m = json.loads((folder / "ideoquant.json").read_text())
        assert m["recipe"]["name"] == ("gguf-q4_k_m" if t == "q4_k_m" else "gguf")
        assert set(m["files"]) == {p.as_posix() for p in together if p.name != "ideoquant.json"}
        assert verify(folder, load=False).ok


def test_a_type_listed_twice_is_refused(bf16_source, tmp_path):
    r = CliRunner().invoke(app, ["gguf", str(bf16_source), "--out", str(tmp_path / "x"), "--type", "q8_0,q8_0"])
    assert r.exit_code == 2 and "each type once" in r.output


def test_eval_takes_a_multi_type_folder_as_its_outputs(bf16_source, tmp_path):
    from ideoquant.evaluation.variants import resolve_variants

    ideoquant.convert_gguf(bf16_source, tmp_path / "many", qtype="q8_0,q4_k_m", components=["transformer"])
    variants = resolve_variants([tmp_path / "many"])
    assert [(v.kind, sorted(v.paths)) for v in variants] == [("gguf", ["transformer"])] * 2
    assert [v.paths["transformer"].rsplit("/", 2)[-2] for v in variants] == ["Q4_K_M", "Q8_0"]
