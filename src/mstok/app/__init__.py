"""``mstok app``: a web app (Gradio) that shows tokenizers and generators at work.

* :mod:`~mstok.app.models`: what a model picker names, loaded once (a cached loader) on the GPU
  when there is one, in float32 on the CPU; presets with random weights are refused;
* :mod:`~mstok.app.handlers`: the Tokenize and Compare tabs (uploads read safely, the error heat
  map, the token-id grid) and :func:`~mstok.app.handlers.decode_prefix`;
* :mod:`~mstok.app.generation`: the Generate tab (class names, sampling settings);
* :mod:`~mstok.app.page`: the Gradio page (Gradio, the optional extra ``app``, is imported there only);
* :mod:`~mstok.app.command`: the ``mstok app`` command, the only place that calls ``launch()``.

Nothing is imported here: ``mstok`` imports :mod:`~mstok.app.command` at start-up, and the rest
loads the demo's photos, the metrics and Gradio, which only ``mstok app`` needs.
"""
