/**
 * The type every file in dashboards/ must satisfy, built from Grafana's own published schema
 * (@grafana/schema, pinned in package.json). tests/test_dashboards.py writes one .ts file per
 * dashboard, `const dashboard: Json<AiopsDashboard> = <the JSON>;`, and runs
 * `tsc --noEmit --strict` over them: an unknown key anywhere (excess-property check) or a value of
 * the wrong type fails the suite.
 *
 * Where the schema's `Dashboard` is looser or narrower than what Grafana stores, this file says so:
 *
 * - `Panel.options` is `Record<string, unknown>` and `Panel.targets` `Record<string, unknown>[]`
 *   in the schema, so each panel type is typed with its own published options and field-config
 *   types (`Options`, `FieldConfig` of raw/composable/<type>/panelcfg) and its targets as
 *   `PromQuery`. A panel type missing from `AnyPanel` is an error: add it here with its types.
 * - `PromQuery` mirrors the Prometheus query model of `@grafana/prometheus` (not part of
 *   @grafana/schema); the Prometheus annotation fields (`titleFormat`, `tagKeys`, ...) likewise.
 * - The schema's `AnnotationQuery.target` is a plain `DataQuery`; a built-in Grafana annotation
 *   query also carries `type`/`tags`/`limit`/`matchAny` (the schema's own `AnnotationTarget`).
 * - Enums: dashboard JSON holds enum members as their string values ("palette-classic"), which
 *   TypeScript does not accept where an enum type is expected; `Json<T>` maps every string enum to
 *   the union of its values and changes nothing else.
 */
import type {
  AnnotationQuery,
  AnnotationTarget,
  Dashboard,
  DataQuery,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as bargauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen.js';
import type * as heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen.js';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen.js';
import type * as statetimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen.js';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen.js';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.js';

/** A type as it appears in JSON: string enum members become their string values. */
export type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

/** A Prometheus panel query (the stored model of @grafana/prometheus' PromQuery). */
export interface PromQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  exemplar?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
  intervalFactor?: number;
  editorMode?: 'code' | 'builder';
}

type PanelOf<Type extends string, Options, FieldConfig = Record<string, unknown>> = Omit<
  Panel<Options, FieldConfig>,
  'type' | 'options' | 'targets'
> & { type: Type; options: Options; targets?: PromQuery[] };

export type AnyPanel =
  | PanelOf<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | PanelOf<'stat', stat.Options>
  | PanelOf<'bargauge', bargauge.Options>
  | PanelOf<'table', table.Options, table.FieldConfig>
  | PanelOf<'state-timeline', statetimeline.Options, statetimeline.FieldConfig>
  | PanelOf<'heatmap', heatmap.Options, heatmap.FieldConfig>
  | (Omit<RowPanel, 'type'> & { type: 'row' });

/** Datasource-specific fields of a Prometheus annotation query (stored beside `target`). */
interface PromAnnotationFields {
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

export type AnyAnnotation =
  | (AnnotationQuery<PromQuery> & PromAnnotationFields)
  | AnnotationQuery<DataQuery & AnnotationTarget>;

export type AiopsDashboard = Omit<Dashboard, 'panels' | 'annotations'> & {
  panels?: AnyPanel[];
  annotations?: { list?: AnyAnnotation[] };
};
