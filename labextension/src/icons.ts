import { LabIcon } from '@jupyterlab/ui-components';

const storeSvg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2 2 7l10 5 10-5-10-5zm0 12.2L4.2 10.3 2 11.4l10 5 10-5-2.2-1.1L12 14.2zm0 4.6-7.8-3.9L2 16l10 5 10-5-2.2-1.1L12 18.8z"/>
  </g>
</svg>`;

/** The model-store icon: a stack of layers (a set of models sharing one architecture). */
export const storeIcon = new LabIcon({ name: 'mm-jupyter:store', svgstr: storeSvg });
