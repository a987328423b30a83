// The interactive splat viewer: gsplat.js (vendor/gsplat.js, npm "gsplat" 1.2.9, MIT) renders the
// reconstruction's .splat (32 bytes a Gaussian, fast3d/io/splat.py) in a WebGL2 canvas; drag to
// orbit, wheel to zoom. app.js calls window.fast3dViewer.show(bytes) with each result.
import * as SPLAT from "/static/vendor/gsplat.js";

let view = null;

function start(canvas) {
  const renderer = new SPLAT.WebGLRenderer(canvas);
  const camera = new SPLAT.Camera();
  // orbit a little above, at 4 units: the unit box (fast3d's objects) then fills about half the view
  const controls = new SPLAT.OrbitControls(camera, canvas, 0.6, 0.35, 4.0);
  const scene = new SPLAT.Scene();
  const frame = () => {
    controls.update();
    renderer.render(scene, camera);
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  return { renderer, camera, controls, scene };
}

// bytes: Uint8Array of a .splat file; replaces what the viewer showed before.
function show(bytes) {
  const canvas = document.getElementById("viewer");
  if (!canvas.getContext("webgl2")) {
    canvas.hidden = true;
    document.getElementById("viewer-status").textContent = "This browser has no WebGL2: no interactive view.";
    return false;
  }
  canvas.hidden = false;
  view ??= start(canvas);
  view.scene.reset();
  const copy = bytes.slice().buffer;  // the loader keeps the buffer: give it its own
  const splat = SPLAT.Loader.LoadFromArrayBuffer(copy, view.scene);
  // fast3d's world is +Z up; the viewer's screen up is its -Y: turn the object by +90 deg about X
  // (+Z -> -Y) so its top is up on screen.
  splat.rotation = SPLAT.Quaternion.FromEuler(new SPLAT.Vector3(Math.PI / 2, 0, 0));
  document.getElementById("viewer-status").textContent = `${bytes.length / 32} Gaussians: drag to orbit, wheel to zoom.`;
  return true;
}

window.fast3dViewer = { show };
