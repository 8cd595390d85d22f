"""The browser pages: the operator dashboard, the live viewer, and sign-in sessions."""
