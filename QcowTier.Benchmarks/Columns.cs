using System.Globalization;
using System.Reflection;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace QcowTier.Benchmarks;

/// <summary>Bytes one benchmark operation moves, for the throughput column.</summary>
[AttributeUsage(AttributeTargets.Class, Inherited = false)]
public sealed class BytesPerOperationAttribute(int bytes) : Attribute
{
    public int Bytes { get; } = bytes;
}

/// <summary>MiB/s from the mean time per operation and the class's <see cref="BytesPerOperationAttribute"/>.</summary>
internal sealed class ThroughputColumn : IColumn
{
    public string Id => nameof(ThroughputColumn);

    public string ColumnName => "MiB/s";

    public bool AlwaysShow => true;

    public ColumnCategory Category => ColumnCategory.Custom;

    public int PriorityInCategory => 0;

    public bool IsNumeric => true;

    public UnitType UnitType => UnitType.Dimensionless;

    public string Legend => "Throughput: bytes per operation / mean time per operation, in MiB/s";

    public bool IsAvailable(Summary summary) => true;

    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, summary.Style);

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style)
    {
        var bytes = benchmarkCase.Descriptor.Type.GetCustomAttribute<BytesPerOperationAttribute>()?.Bytes;
        var mean = summary[benchmarkCase]?.ResultStatistics?.Mean; // ns per operation
        if (bytes is null || mean is null or <= 0)
        {
            return "-";
        }
        var mibPerSecond = bytes.Value / mean.Value * 1e9 / (1 << 20);
        return mibPerSecond.ToString("N0", CultureInfo.InvariantCulture);
    }
}
