"""Training and evaluation of the stages' models. The worker imports only what a model export
names (the tagger's item and label functions in handlers.training.tagger) when it unpickles."""
