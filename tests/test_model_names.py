import pytest

from rana_core.errors import ModelNotFound
from rana_core.model_source import resolve_model


def test_bundled_and_tiny_resolve_without_loading():
    assert resolve_model("tiny").kind == "tiny"
    smol = resolve_model("smollm2-135m")
    assert smol.kind == "gguf" and smol.gguf_file.endswith(".gguf")


def test_hub_ids_and_folders(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).kind == "folder"


@pytest.mark.parametrize("name, message", [
    ("llama-9000", "unknown model"),
    ("./no/such/folder", "not found"),
    ("/definitely/missing", "not found"),
    ("", "no model given"),
])
def test_bad_names_are_refused(name, message):
    with pytest.raises(ModelNotFound, match=message):
        resolve_model(name)


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="not a model folder"):
        resolve_model(str(tmp_path))


def test_a_folder_with_exactly_one_gguf_file_resolves_to_it(tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"")  # resolving reads no weights (loading: test_bundled_model)
    (tmp_path / "README.md").write_text("notes")
    source = resolve_model(str(tmp_path))
    assert (source.kind, source.location, source.gguf_file) == ("gguf", str(tmp_path), "model.Q4_0.gguf")
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="several .gguf files"):
        resolve_model(str(tmp_path))
