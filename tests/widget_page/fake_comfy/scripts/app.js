// Test double of ComfyUI's scripts/app.js for tests/widget_page/extension.html. It only records what the
// extension registers; tests/test_widget_frontend_api.py checks the names we use against the real frontend.
export const app = {
  extensions: [],
  registerExtension(extension) {
    this.extensions.push(extension);
  },
};
