#!/usr/bin/env python3
"""llamacpp_server.py - llama-cpp-python's OpenAI server, the reference for
`entrokv bench serve`, with llama.cpp's CPU "extra buffer types" (AMX
repacking) off: on VMs that advertise AMX without enabling it ggml dies with
SIGILL on the first request (see llamacpp_ref.py). Arguments are the
server's own (python -m llama_cpp.server --help)."""
import runpy

import llama_cpp.llama_cpp as C

_default = C.llama_model_default_params


def _params():
    p = _default()
    p.use_extra_bufts = False
    return p


C.llama_model_default_params = _params
runpy.run_module("llama_cpp.server", run_name="__main__")
