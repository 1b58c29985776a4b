"""fraqat-export: deployable layers, packed safetensors and ONNX files, and loading them back."""
