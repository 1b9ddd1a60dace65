namespace QcowTier.Cli.Infrastructure;

/// <summary>
/// getopt_long as qemu-img uses it: short options may be bundled (-wq) and take their argument
/// attached or separate (-fqcow2, -f qcow2); long options take "=value" or the next word and may be
/// abbreviated to a unique prefix; options and operands may be interleaved; "--" ends options.
/// </summary>
internal sealed class OptionParser
{
    private readonly string _shortSpec;
    private readonly (string Name, bool HasArg)[] _longs;

    /// <param name="shortSpec">getopt's spec: a letter, followed by ':' when it takes an argument.</param>
    /// <param name="longs">Long options; "help" is always added.</param>
    public OptionParser(string shortSpec, params (string Name, bool HasArg)[] longs)
    {
        _shortSpec = shortSpec + "h";
        _longs = [.. longs, ("help", false)];
    }

    /// <summary>getopt's own wording ("invalid option -- 'x'"), as qemu-io commands print it, instead of qemu-img's.</summary>
    public bool GetoptMessages { get; init; }

    public ParsedOptions Parse(IReadOnlyList<string> args)
    {
        var result = new ParsedOptions();
        for (var i = 0; i < args.Count; i++)
        {
            var a = args[i];
            if (a == "--")
            {
                for (i++; i < args.Count; i++)
                {
                    result.Operands.Add(args[i]);
                }
                break;
            }
            if (a.StartsWith("--", StringComparison.Ordinal))
            {
                i = ParseLong(args, i, result);
            }
            else if (a.Length > 1 && a[0] == '-')
            {
                i = ParseShort(args, i, result);
            }
            else
            {
                result.Operands.Add(a);
            }
        }
        return result;
    }

    private int ParseLong(IReadOnlyList<string> args, int i, ParsedOptions result)
    {
        var body = args[i][2..];
        var eq = body.IndexOf('=', StringComparison.Ordinal);
        var name = eq >= 0 ? body[..eq] : body;
        var matches = _longs.Where(l => l.Name == name).ToList();
        if (matches.Count == 0)
        {
            matches = _longs.Where(l => l.Name.StartsWith(name, StringComparison.Ordinal)).ToList();
        }
        if (matches.Count == 0)
        {
            throw new CliException($"unrecognized option '--{name}'");
        }
        if (matches.Count > 1)
        {
            throw new CliException($"option '--{name}' is ambiguous");
        }
        var (full, hasArg) = matches[0];
        if (!hasArg)
        {
            if (eq >= 0)
            {
                throw new CliException($"option '--{full}' doesn't allow an argument");
            }
            result.Add(full, null);
            return i;
        }
        if (eq >= 0)
        {
            result.Add(full, body[(eq + 1)..]);
            return i;
        }
        if (i + 1 >= args.Count)
        {
            throw new CliException(GetoptMessages ? $"option '--{full}' requires an argument" : $"missing argument for option '--{full}'");
        }
        result.Add(full, args[i + 1]);
        return i + 1;
    }

    private int ParseShort(IReadOnlyList<string> args, int i, ParsedOptions result)
    {
        var a = args[i];
        for (var j = 1; j < a.Length; j++)
        {
            var c = a[j];
            var at = c == ':' ? -1 : _shortSpec.IndexOf(c, StringComparison.Ordinal);
            if (at < 0)
            {
                throw new CliException(GetoptMessages ? $"invalid option -- '{c}'" : $"unrecognized option '-{c}'");
            }
            var hasArg = at + 1 < _shortSpec.Length && _shortSpec[at + 1] == ':';
            if (!hasArg)
            {
                result.Add(c.ToString(), null);
                continue;
            }
            if (j + 1 < a.Length)
            {
                result.Add(c.ToString(), a[(j + 1)..]);
                return i;
            }
            if (i + 1 >= args.Count)
            {
                throw new CliException(GetoptMessages ? $"option requires an argument -- '{c}'" : $"missing argument for option '-{c}'");
            }
            result.Add(c.ToString(), args[i + 1]);
            return i + 1;
        }
        return i;
    }
}

/// <summary>Options in command-line order (later ones win, as with getopt loops) and the operands.</summary>
internal sealed class ParsedOptions
{
    public List<(string Key, string? Value)> Options { get; } = [];

    public List<string> Operands { get; } = [];

    public void Add(string key, string? value) => Options.Add((key, value));

    public bool Has(string key) => Options.Any(o => o.Key == key);

    public bool WantsHelp => Has("h") || Has("help");

    /// <summary>The last value given for the option, or null.</summary>
    public string? Get(string key)
    {
        for (var i = Options.Count - 1; i >= 0; i--)
        {
            if (Options[i].Key == key)
            {
                return Options[i].Value;
            }
        }
        return null;
    }

    public IEnumerable<string> GetAll(string key) => Options.Where(o => o.Key == key).Select(o => o.Value ?? "");
}
