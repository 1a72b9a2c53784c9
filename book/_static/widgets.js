// The book's pages are static: a widget's last state, as the notebook saved it, is drawn here
// (boxes, progress bars, labels) instead of loading the ipywidgets manager from a CDN.
document.addEventListener("DOMContentLoaded", () => {
  const saved = document.querySelector('script[type="application/vnd.jupyter.widget-state+json"]');
  if (!saved) return;
  const models = JSON.parse(saved.textContent).state;
  const draw = (id) => {
    const model = models[id.replace(/^IPY_MODEL_/, "")];
    if (!model) return document.createTextNode("");
    const s = model.state, name = model.model_name;
    if (name === "VBoxModel" || name === "HBoxModel") {
      const box = document.createElement("div");
      box.style.cssText = `display:flex; gap:0.5em; flex-direction:${name === "VBoxModel" ? "column" : "row"}`;
      s.children.forEach((child) => box.appendChild(draw(child)));
      return box;
    }
    const part = document.createElement("span");
    if (name === "IntProgressModel" || name === "FloatProgressModel") {
      const bar = document.createElement("progress");
      bar.max = s.max - s.min;
      bar.value = s.value - s.min;
      part.append(s.description ? s.description + " " : "", bar);
    } else {
      part.textContent = s.value !== undefined ? String(s.value) : name.replace(/Model$/, "");
    }
    return part;
  };
  document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').forEach((view) => {
    const shown = draw(JSON.parse(view.textContent).model_id);
    const frame = document.createElement("div");
    frame.className = "jupyter-widgets static-widget";
    frame.appendChild(shown);
    view.after(frame);
  });
});
