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


def test_a_gguf_file_named_directly_resolves_to_it_beside_other_gguf_files(tmp_path):
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"")  # resolving reads no weights
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"")  # the folder alone would be ambiguous; the file is not
    source = resolve_model(str(tmp_path / "model.Q8_0.gguf"))
    assert (source.kind, source.location, source.gguf_file) == ("gguf", str(tmp_path), "model.Q8_0.gguf")


@pytest.mark.parametrize("name, message", [
    ("missing.gguf", "model file not found: {folder}/missing.gguf"),
    ("config.json", "{folder}/config.json is a file: give its model folder, or a .gguf file"),
], ids=["missing-gguf", "not-a-gguf"])
def test_a_file_that_is_not_a_gguf_checkpoint_is_refused(tmp_path, name, message):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound) as refused:
        resolve_model(str(tmp_path / name))
    assert str(refused.value) == message.format(folder=tmp_path)


@pytest.mark.bundled
def test_the_bundled_gguf_loads_from_its_file_path(tmp_path):
    import importlib.util
    from pathlib import Path

    from rana_core.loading import load_model
    from rana_core.model_source import SMOLLM2_FILE, SMOLLM2_PACKAGE

    shipped = Path(importlib.util.find_spec(SMOLLM2_PACKAGE).origin).parent / SMOLLM2_FILE
    link = tmp_path / "smol.gguf"
    link.symlink_to(shipped)
    (tmp_path / "other.gguf").write_bytes(b"")  # not read: the named file is the one loaded
    loaded = load_model(str(link))
    config = loaded.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (576, 30, 3)
    assert loaded.weights_file == str(link)
