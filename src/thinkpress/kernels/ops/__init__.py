"""The ops: one module each (checks, torch reference, public function with backend dispatch)."""
