"""Colours every plot shares (analysis and reproduction), as the blog draws them: image red, text blue."""

IMAGE_COLOUR, TEXT_COLOUR = "#d62728", "#1f77b4"
