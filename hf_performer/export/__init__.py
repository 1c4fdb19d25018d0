"""Sharing FAVOR+ checkpoints: conversion of stock checkpoints, exported model code, model cards."""

from hf_performer.export.conversion import ConversionError, convert, push

__all__ = ["ConversionError", "convert", "push"]
