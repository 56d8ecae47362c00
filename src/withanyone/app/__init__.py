"""WithAnyone Studio: the Gradio web app over ``WithAnyonePipeline`` (``withanyone app``, ``python -m withanyone.app``).

Needs the ``app`` extra (``pip install 'withanyone[app]'``). ``--tiny`` runs it without weights on a tiny
random model (images are noise); with weights missing it starts and says which file is missing.
"""

from __future__ import annotations

from .models import PRESETS, LoadedModels, LoadOptions, load_models
from .people import PhotoAnalysis, analyse_photo, assign_layout, merge_identity
from .studio import Person, Placement, Studio

__all__ = ["PRESETS", "LoadOptions", "LoadedModels", "Person", "PhotoAnalysis", "Placement", "Studio",
           "analyse_photo", "assign_layout", "launch", "load_models", "merge_identity"]


def launch(opts: LoadOptions, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           out_dir: str | None = None, block: bool = True):
    """Load the models (or record why not), build the UI and serve it; returns the Blocks when not blocking."""
    import tempfile

    from .edit import Editor, KontextOptions
    from .ui import blocks_css_kwargs, build_ui

    models = load_models(opts)
    studio = Studio(models, out_dir or tempfile.mkdtemp(prefix="withanyone-studio-"))
    editor = Editor(studio, KontextOptions(base=opts.kontext_base, adapter=opts.kontext_adapter,
                                           adapter_file=opts.kontext_adapter_file, face_pack=opts.face_pack,
                                           tiny=opts.tiny,
                                           offline=opts.offline))
    demo = build_ui(studio, editor)
    demo.queue(default_concurrency_limit=1, max_size=16)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                allowed_paths=[str(studio.out_dir)], show_error=True, quiet=False, **blocks_css_kwargs(demo.launch))
    return demo
