// ComfyUI extension: the live metrics plot inside the Train and Plot Metrics nodes.
//
// Served by ComfyUI at /extensions/<pack>/phase_trainer.js (WEB_DIRECTORY = "./web"), so ComfyUI's own
// modules are two levels up. A wrong depth 404s and the extension silently never registers.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { MetricsPlot } from "./plot.js";

const PLOT_NODE_TYPES = new Set(["PhaseTrainerTrain", "PhaseTrainerPlotMetrics"]);
const LIVE_EVENT = "phase_trainer.metrics"; // sent by nodes/train.py with PromptServer.send_sync
const OUTPUT_KEY = "phase_trainer_metrics"; // the node's ui output: [payload]
const STORED_PAYLOAD = "phase_trainer_last_metrics"; // node.properties: the last plot, saved with the workflow
const STORED_TOGGLES = "phase_trainer_plot_toggles";
const MAX_STORED_ROWS = 2000; // keeps a saved workflow small however long the run was
const MIN_PLOT_HEIGHT = 220;
const MIN_NODE_WIDTH = 420;

const plots = new Set(); // every NodePlot alive, to route live messages by node id

class NodePlot {
  constructor(node) {
    this.node = node;
    this.container = document.createElement("div");
    this.container.style.cssText =
      "position:relative;width:100%;height:100%;min-height:120px;overflow:hidden;display:flex;flex-direction:column;";
    // The canvas fills what the caption leaves; the caption (the run's summary: stop advice, best LoRA, files)
    // is plain text, hidden until a run reports one.
    this.canvasBox = document.createElement("div");
    this.canvasBox.style.cssText = "position:relative;flex:1 1 auto;min-height:0;";
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = "display:block;width:100%;height:100%;";
    this.canvasBox.appendChild(this.canvas);
    this.caption = document.createElement("div");
    this.caption.className = "phase-trainer-summary";
    this.caption.style.cssText =
      "display:none;flex:0 0 auto;padding:3px 6px;font:11px system-ui,sans-serif;color:#c9d1d9;background:#15171c;" +
      "white-space:pre-wrap;overflow-wrap:anywhere;max-height:64px;overflow:auto;user-select:text;";
    this.container.append(this.canvasBox, this.caption);
    this.plot = new MetricsPlot(this.canvas, {
      toggles: node.properties?.[STORED_TOGGLES] || {},
      onToggle: (toggles) => this._setProperty(STORED_TOGGLES, toggles),
    });
    this.widget = node.addDOMWidget("metrics_plot", "PT_PLOT", this.container, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => MIN_PLOT_HEIGHT,
      getValue: () => undefined,
      setValue: () => {},
    });
    this.widget.serialize = false;
    this.observer = new ResizeObserver((entries) => {
      const box = entries[entries.length - 1].contentRect;
      this.plot.resize(box.width, box.height);
    });
    this.observer.observe(this.canvasBox);
    plots.add(this);
  }

  _setProperty(key, value) {
    this.node.properties = this.node.properties || {};
    this.node.properties[key] = value;
  }

  onLive(detail) {
    this.plot.update(detail);
    this.showSummary();
    if (detail.done) this.store();
  }

  restore(payload) {
    if (!payload || !Array.isArray(payload.rows)) return false;
    this.plot.setPayload(payload);
    this.showSummary();
    return true;
  }

  showSummary() {
    const lines = this.plot.data.summary || [];
    this.caption.textContent = lines.join("\n");
    this.caption.style.display = lines.length ? "block" : "none";
  }

  store() {
    this._setProperty(STORED_PAYLOAD, this.plot.toPayload(MAX_STORED_ROWS));
  }

  dispose() {
    plots.delete(this);
    this.observer.disconnect();
    this.plot.destroy();
  }
}

function chain(object, method, after) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

// The server names a node inside a subgraph by its execution id, the path of node ids from the root graph
// ("5:3": node 3 in the subgraph of node 5), while the node object only knows its own id (3). Walk the path
// through each subgraph node's `subgraph`; null when the graph cannot be walked (then ids are compared).
function nodeForExecutionId(executionId) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const id of executionId.split(":")) {
    if (!graph?.getNodeById) return null;
    node = graph.getNodeById(id) ?? graph.getNodeById(Number(id));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

app.registerExtension({
  name: "PhaseTrainer.MetricsPlot",

  setup() {
    api.addEventListener(LIVE_EVENT, ({ detail }) => {
      if (!detail || detail.node === undefined || detail.node === null) return;
      const target = nodeForExecutionId(String(detail.node));
      for (const p of plots) {
        if (target ? p.node === target : String(p.node.id) === String(detail.node)) p.onLive(detail);
      }
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PLOT_NODE_TYPES.has(nodeData?.name)) return;
    const proto = nodeType.prototype;

    chain(proto, "onNodeCreated", function () {
      this.phaseTrainerPlot = new NodePlot(this);
      const [w, h] = this.size;
      const minH = this.computeSize ? this.computeSize()[1] : h;
      this.setSize([Math.max(w, MIN_NODE_WIDTH), Math.max(h, minH)]);
    });

    // A loaded (or reloaded) workflow brings its properties back: show the last stored plot.
    chain(proto, "onConfigure", function () {
      const plot = this.phaseTrainerPlot;
      if (!plot) return;
      const toggles = this.properties?.[STORED_TOGGLES];
      if (toggles) Object.assign(plot.plot.toggles, toggles);
      plot.restore(this.properties?.[STORED_PAYLOAD]);
    });

    chain(proto, "onExecuted", function (message) {
      const plot = this.phaseTrainerPlot;
      const payload = message?.[OUTPUT_KEY]?.[0];
      if (plot && plot.restore(payload)) plot.store();
    });

    chain(proto, "onRemoved", function () {
      this.phaseTrainerPlot?.dispose();
      this.phaseTrainerPlot = null;
    });
  },
});
