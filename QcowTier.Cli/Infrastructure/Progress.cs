using System.Globalization;

namespace QcowTier.Cli.Infrastructure;

/// <summary>
/// qemu-img -p. On a terminal a bar is redrawn in place; anywhere else the output is qemu-img's own
/// plain "    (NN.NN/100%)\r" records, printed at most once per percent, so scripts parsing it carry over.
/// </summary>
internal sealed class Progress
{
    private const int BarWidth = 30;
    private readonly CliContext _ctx;
    private readonly bool _enabled;
    private readonly object _lock = new();
    private double _current;
    private double _lastPrint = double.NaN;

    public Progress(CliContext ctx, bool enabled)
    {
        _ctx = ctx;
        _enabled = enabled;
        Print(0);
    }

    /// <summary>Adds a share of the whole job, in percent.</summary>
    public void Advance(double percent)
    {
        if (!_enabled)
        {
            return;
        }
        lock (_lock)
        {
            _current = Math.Min(100, _current + percent);
            if (_current - _lastPrint > 1.0 || _current >= 100)
            {
                Print(_current);
            }
        }
    }

    public void Finish()
    {
        if (!_enabled)
        {
            return;
        }
        lock (_lock)
        {
            _current = 100;
            Print(100);
            _ctx.Out.Write('\n');
            _ctx.Out.Flush();
        }
    }

    private void Print(double value)
    {
        if (!_enabled)
        {
            return;
        }
        _lastPrint = value;
        var pct = value.ToString("0.00", CultureInfo.InvariantCulture);
        if (_ctx.StdoutIsTerminal)
        {
            var filled = (int)(value / 100 * BarWidth);
            _ctx.Out.Write($"\r    ({pct}/100%) [{new string('#', filled)}{new string('.', BarWidth - filled)}]");
        }
        else
        {
            _ctx.Out.Write($"    ({pct}/100%)\r");
        }
        _ctx.Out.Flush();
    }
}
