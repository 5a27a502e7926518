"""The web page of ``mstok app``: three tabs (Tokenize, Compare, Generate) wired to the handlers.

Gradio is the optional extra ``app`` (``pip install "mstok[app]"``): it is imported only inside
:func:`build_page`, so ``mstok`` and its other commands neither need it nor pay its import time.
Every event goes through :func:`_guard`: an exception becomes one readable line in the tab's
status box (never a traceback), the other outputs stay as they were.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mstok.app.generation import MAX_SAMPLES, generate, generator_settings
from mstok.app.handlers import (
    APP_MAX_PIXELS,
    EXAMPLES,
    HEAT_MAX,
    Reconstruction,
    compare,
    reconstruct,
    redraw,
    user_message,
)
from mstok.app.models import ModelCache

TITLE = "mstok: compact 1D image tokenizers"
PICKER_INFO = "a run folder, a saved model, a hub id, or official:<release> (fetched once into the hub cache)"


def _guard(outputs: int, work: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    """``work`` returns its outputs after the status line; on an exception the status line says
    what went wrong and the ``outputs`` other components keep their values."""
    import gradio as gr  # lazy: gradio is the optional "app" extra (pip install "mstok[app]"), loaded only for the page

    def run(*args: Any) -> list[Any]:
        try:
            return ["", *work(*args)]
        except Exception as err:  # every failure becomes a line in the page; bugs are logged with their traceback
            return [user_message(err), *[gr.update() for _ in range(outputs)]]

    return run


def _view(gr: Any, result: Reconstruction) -> list[Any]:
    """The Tokenize tab's outputs for one reconstruction."""
    s = result.slider
    return [
        result.original,
        result.recon,
        result.heatmap,
        result.metrics + (f"  \n{result.note}" if result.note else ""),
        gr.update(
            minimum=s.minimum,
            maximum=max(s.maximum, s.minimum + 1),  # a slider needs two positions to draw
            value=s.value,
            interactive=s.interactive,
            label=s.label,
            info=s.info,
        ),
        gr.update(value={"data": result.rows, "headers": result.headers}),
        result.state,
    ]


def _picker(gr: Any, label: str, choices: Sequence[str], elem_id: str, value: str | None = None) -> Any:
    return gr.Dropdown(
        choices=list(choices),
        value=value if value is not None else (choices[0] if choices else None),
        allow_custom_value=True,
        filterable=True,
        label=label,
        info=PICKER_INFO,
        elem_id=elem_id,
    )


def _image_inputs(gr: Any, prefix: str) -> tuple[Any, Any]:
    upload = gr.File(label="an image file (PNG, JPEG, ...)", type="filepath", height=150, elem_id=f"{prefix}-upload")
    example = gr.Dropdown(
        list(EXAMPLES), value=EXAMPLES[0], label="or a photo shipped with scikit-image", elem_id=f"{prefix}-example"
    )
    return upload, example


def build_page(
    cache: ModelCache,
    tokenizers: Sequence[str] = (),
    generators: Sequence[str] = (),
    max_pixels: int = APP_MAX_PIXELS,
    class_names: str | Path | None = None,
) -> Any:
    """The app's ``gr.Blocks`` (not launched): ``tokenizers`` and ``generators`` fill the pickers,
    which also take any path or hub id typed in."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reports leave the machine
    import gradio as gr  # lazy: gradio is the optional "app" extra (pip install "mstok[app]"), loaded only for the page

    with gr.Blocks(title="mstok", analytics_enabled=False) as page:
        gr.Markdown(
            f"## {TITLE}\nModels run on {cache.runtime.describe()}. Pick a trained model: a preset's "
            "random weights are refused."
        )
        with gr.Tab("Tokenize", elem_id="tab-tokenize"):
            with gr.Row():
                with gr.Column(scale=1):
                    model = _picker(gr, "tokenizer", tokenizers, "tok-model")
                    upload, example = _image_inputs(gr, "tok")
                    run = gr.Button("Tokenize", variant="primary", elem_id="tok-run")
                with gr.Column(scale=3):
                    status = gr.Markdown(elem_id="tok-status")
                    with gr.Row():
                        original = gr.Image(
                            format="png", label="image (center crop)", interactive=False, elem_id="tok-original"
                        )
                        recon = gr.Image(format="png", label="reconstruction", interactive=False, elem_id="tok-recon")
                        heat = gr.Image(
                            label=f"error (black 0, yellow ≥ {HEAT_MAX})", interactive=False, elem_id="tok-heat"
                        )
                    metrics = gr.Markdown(elem_id="tok-metrics")
                    slider = gr.Slider(
                        1, 2, value=1, step=1, label="tokens decoded", interactive=False, elem_id="tok-slider"
                    )
                    ids = gr.Dataframe(
                        label="token ids (latents: norm and first channels)", interactive=False, elem_id="tok-ids"
                    )
            state = gr.State()
            outputs = [status, original, recon, heat, metrics, slider, ids, state]

            def tokenize(spec: str, file: str | None, photo: str | None) -> list[Any]:
                return _view(gr, reconstruct(cache, spec, file, photo, max_pixels))

            guarded = _guard(len(outputs) - 1, tokenize)
            run.click(guarded, [model, upload, example], outputs, api_name="tokenize")
            upload.upload(guarded, [model, upload, example], outputs, api_name=False)
            example.input(
                _guard(len(outputs) - 1, lambda spec, photo: tokenize(spec, None, photo)),
                [model, example],
                outputs,
                api_name=False,
            )
            slider.release(
                _guard(3, lambda held, n: list(redraw(cache, held, n))),
                [state, slider],
                [status, recon, heat, metrics],
                api_name="redraw",
            )

        with gr.Tab("Compare", elem_id="tab-compare"):
            with gr.Row():
                model_a = _picker(gr, "tokenizer A", tokenizers, "cmp-model-a")
                model_b = _picker(
                    gr, "tokenizer B", tokenizers, "cmp-model-b", tokenizers[1] if len(tokenizers) > 1 else None
                )
            with gr.Row():
                cmp_upload, cmp_example = _image_inputs(gr, "cmp")
                cmp_run = gr.Button("Compare", variant="primary", elem_id="cmp-run")
            cmp_status = gr.Markdown(elem_id="cmp-status")
            with gr.Row():
                cmp_original = gr.Image(format="png", label="image", interactive=False, elem_id="cmp-original")
                recon_a = gr.Image(format="png", label="A", interactive=False, elem_id="cmp-recon-a")
                recon_b = gr.Image(format="png", label="B", interactive=False, elem_id="cmp-recon-b")
            with gr.Row():
                heat_a = gr.Image(format="png", label="error of A", interactive=False, elem_id="cmp-heat-a")
                heat_b = gr.Image(format="png", label="error of B", interactive=False, elem_id="cmp-heat-b")
            table = gr.Markdown(elem_id="cmp-table")

            def side_by_side(spec_a: str, spec_b: str, file: str | None, photo: str | None) -> list[Any]:
                a, b, text = compare(cache, spec_a, spec_b, file, photo, max_pixels)
                return [a.original, a.recon, b.recon, a.heatmap, b.heatmap, text]

            cmp_outputs = [cmp_status, cmp_original, recon_a, recon_b, heat_a, heat_b, table]
            cmp_run.click(
                _guard(6, side_by_side), [model_a, model_b, cmp_upload, cmp_example], cmp_outputs, api_name="compare"
            )

        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                gen_model = _picker(gr, "generator", generators, "gen-model")
                gen_tok = _picker(gr, "its tokenizer", tokenizers, "gen-tokenizer")
            with gr.Row():
                label = gr.Dropdown(
                    [], label="class (type to search)", filterable=True, allow_custom_value=True, elem_id="gen-class"
                )
                guidance = gr.Slider(0, 20, value=0, step=0.1, label="guidance scale", elem_id="gen-guidance")
                steps = gr.Number(
                    8, precision=0, minimum=0, label="steps (0: the sampler's default)", elem_id="gen-steps"
                )
                samples = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples", elem_id="gen-samples")
                seed = gr.Number(0, precision=0, label="seed", elem_id="gen-seed")
            with gr.Row():
                load = gr.Button("Load models", elem_id="gen-load")
                draw = gr.Button("Generate", variant="primary", elem_id="gen-run")
            gen_status = gr.Markdown(elem_id="gen-status")
            gallery = gr.Gallery(format="png", label="samples", columns=8, height="auto", elem_id="gen-gallery")
            caption = gr.Markdown(elem_id="gen-caption")

            def settings(gen_spec: str, tok_spec: str) -> list[Any]:
                found = generator_settings(cache, gen_spec, tok_spec, class_names)
                first = found.classes[0] if found.classes else None
                return [gr.update(choices=found.classes, value=first), found.guidance, found.steps, found.note]

            load.click(
                _guard(4, settings),
                [gen_model, gen_tok],
                [gen_status, label, guidance, steps, caption],
                api_name="generator_settings",
            )

            def sample(*args: Any) -> list[Any]:
                return list(generate(cache, *args))

            draw.click(
                _guard(2, sample),
                [gen_model, gen_tok, label, guidance, steps, samples, seed],
                [gen_status, gallery, caption],
                api_name="generate",
            )
    return page
