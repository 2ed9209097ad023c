"""The browser app (`python -m medqa.chat.app`): base and fine-tuned models side by side and a chat with the
fine-tuned one, batched across users, with logins and HTTPS for a team."""
