"""Run llama.cpp's own convert_hf_to_gguf.py on a tiny test checkpoint:
    python convert_with_llama_cpp.py LLAMA_CPP_SOURCE HF_DIR --outfile OUT.gguf --outtype f32

The tiny checkpoints' trained byte-level BPE tokenizer is not one llama.cpp knows (it recognises
tokenizers by a hash and SentencePiece by tokenizer.model): every model class's vocabulary step is
its GPT-2 path here. The weights and hyper-parameters go through the converter untouched.
"""

import runpy
import sys
from pathlib import Path

root = Path(sys.argv[1])
sys.path[:0] = [str(root / "gguf-py"), str(root)]
import conversion  # noqa: E402
from conversion import base  # noqa: E402

conversion.load_all_models()  # every model class, so that each one's vocabulary step can be replaced


def _subclasses(cls: type):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt2"
for cls in [base.TextModel, *_subclasses(base.TextModel)]:
    if "set_vocab" in cls.__dict__:
        cls.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")
