"""Secure-computation protocol building blocks that do not depend on CrypTen."""
