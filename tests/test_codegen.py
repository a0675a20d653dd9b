"""The committed gRPC code in engine/api matches proto/ (regenerated here)."""

from engine.codegen import API_DIR, GENERATED_NAMES, generate


def test_committed_code_matches_proto(tmp_path):
    generate(tmp_path)
    for name in GENERATED_NAMES:
        assert (tmp_path / name).read_text() == (API_DIR / name).read_text(), (
            f"engine/api/{name} is stale: run `python -m engine.codegen`"
        )
