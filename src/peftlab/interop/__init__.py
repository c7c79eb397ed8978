"""Other libraries' on-disk formats (Hugging Face peft), read and written through the method registry;
below the methods, which each own their codec."""
