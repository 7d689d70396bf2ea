// Test double of ComfyUI's scripts/api.js: the real `api` is an EventTarget that dispatches CustomEvents
// whose `detail` is the server message's data; that is all the extension relies on.
export const api = new EventTarget();
