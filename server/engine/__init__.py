"""The serving engine: model runtime, continuous-batching scheduler, pack cache, sampling."""
