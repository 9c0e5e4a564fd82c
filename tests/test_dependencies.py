"""Every module the vLLM-venv suite needs imports here (the SGLang venv has its own guard in
tests/test_sglang_plugin.py): a dependency missing from the environment fails this test instead of
silently skipping the files that need it (hypothesis -> test_robustness.py, sentencepiece ->
test_llava*.py, compressed-tensors -> the packing reference, ...)."""
import importlib

import pytest

# module -> what needs it
SUITE_MODULES = {
    "torch": "everything",
    "safetensors": "checkpoint files (tests/reference.py, ckpt_files.py)",
    "vllm": "test_vllm_plugin.py, test_dispatch.py, test_load.py, test_vllm_errors.py, test_llava.py",
    "transformers": "test_convert.py, test_synthetic.py, test_llava_hf.py, test_cli.py (stock loaders)",
    "tokenizers": "test_synthetic.py",
    "sentencepiece": "test_llava.py, test_llava_hf.py, test_synthetic.py (LLaVA's Llama tokenizer)",
    "hypothesis": "test_robustness.py (fuzzing of the readers)",
    "compressed_tensors": "test_packing.py, test_convert.py (the library's own packer)",
    "PIL": "image requests (test_vllm_plugin.py, test_load.py, test_llava*.py)",
    "requests": "test_vllm_plugin.py (vllm serve over HTTP)",
    "huggingface_hub": "test_llava.py",
    "yaml": "test_repo_scripts.py",
    "numpy": "test_sglang_plugin.py (SGLang venv; imported by vLLM too)",
}


@pytest.mark.parametrize("module", sorted(SUITE_MODULES))
def test_suite_dependency_imports(module):
    try:
        importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} does not import ({e}); needed by {SUITE_MODULES[module]}: install it "
                    f"(scripts/setup.sh) instead of letting those tests skip", pytrace=False)


def test_compressed_tensors_public_packer():
    """The packing reference uses compressed-tensors' public API (re-exported by
    compressed_tensors.compressors), not a private module path that moves between releases."""
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
    assert callable(pack_to_int32) and callable(unpack_from_int32)
