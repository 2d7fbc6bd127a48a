"""log_figures: figures go to the loggers that take them (TensorBoard's add_figure) and are drawn only then."""

from types import SimpleNamespace

from backbones.training.figures import figure_experiments, log_figures


def _logger_taking_figures(calls):
    return SimpleNamespace(experiment=SimpleNamespace(add_figure=lambda *a, **k: calls.append((a, k))))


def test_figures_go_only_to_loggers_that_take_them():
    calls = []
    csv_like = SimpleNamespace(experiment=SimpleNamespace(log_metrics=lambda *a: None))
    trainer = SimpleNamespace(loggers=[csv_like, _logger_taking_figures(calls), _logger_taking_figures(calls)])
    assert len(figure_experiments(trainer)) == 2
    assert log_figures(trainer, {"val_confusion_matrix": "figure"}, step=7) == 2
    assert calls == [(("val_confusion_matrix", "figure"), {"global_step": 7})] * 2


def test_figures_are_not_drawn_without_a_logger_that_takes_them():
    drawn = []

    def draw():
        drawn.append(True)
        return {"tag": "figure"}

    no_figures = SimpleNamespace(loggers=[SimpleNamespace(experiment=SimpleNamespace())])
    assert log_figures(no_figures, draw, step=0) == 0 and not drawn
    calls = []
    assert log_figures(SimpleNamespace(loggers=[_logger_taking_figures(calls)]), draw, step=3) == 1
    assert drawn == [True] and calls == [(("tag", "figure"), {"global_step": 3})]
