"""Quantization algorithms (RTN, GPTQ, ...) that turn dense linears into QuantLinear layers."""
